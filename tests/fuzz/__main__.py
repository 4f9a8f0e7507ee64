"""`python -m tests.fuzz --seconds 600 [--url http://127.0.0.1:11434] [--log server.log]`

Fuzzes a running server (only on 127.0.0.1), or, without --url, one started here on a free loopback
port with its own store (as the test fixture does). Prints the summary and every finding; exits 1
on a finding. Give --log the server's log file to have runner deaths and unexpected errors noticed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from tests.fuzz.run import fuzz


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[1])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to send requests (default 60)")
    parser.add_argument("--url", help="a running server, http://127.0.0.1:<port>; default: start one here")
    parser.add_argument("--log", type=Path, help="the running server's log file, watched for failures")
    parser.add_argument("--keep", action="store_true", help="keep the started server's store and log")
    args = parser.parse_args(argv)
    if args.url:
        report = fuzz(args.url, args.seconds, args.log)
        return 1 if report.findings else 0

    from tests.conftest import start_server

    base = Path(tempfile.mkdtemp(prefix="berth-fuzz-"))
    server = start_server(base / "models", base / "server.log")
    try:
        print(f"started a server at {server.url}; its log: {server.log_path}", flush=True)
        report = fuzz(server.url, args.seconds, server.log_path)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
