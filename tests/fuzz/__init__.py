"""A fuzzing harness for Berth's HTTP API: typed and mistyped values for every request field, and
mangled whole bodies, sent to a live server (tests/fuzz/run.py drives it; strategies.py makes the
requests). Run it with pytest (tests/fuzz/test_fuzz_api.py, BERTH_FUZZ_SECONDS) or by hand:
`python -m tests.fuzz --seconds 600 [--url http://127.0.0.1:11434]`.
"""
