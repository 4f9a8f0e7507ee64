"""Fuzzing the live server's API (tests/fuzz/run.py) for a bounded time: BERTH_FUZZ_SECONDS, 60 by
default. Longer runs by hand: `python -m tests.fuzz --seconds 600`."""

from __future__ import annotations

import os

import pytest

from tests.conftest import BerthServer
from tests.fuzz.run import fuzz


def test_fuzz_api(server: BerthServer) -> None:
    seconds = float(os.environ.get("BERTH_FUZZ_SECONDS", "60"))
    report = fuzz(server.url, seconds, server.log_path)
    if report.findings:
        pytest.fail(f"{len(report.findings)} distinct findings:\n{report.findings_text()}", pytrace=False)
