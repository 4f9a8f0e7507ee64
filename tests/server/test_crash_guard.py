"""The crash guard's counting, with a fake clock (the live behaviour is in test_hostile.py)."""

from __future__ import annotations

import pytest

from berth.server import crash_guard
from berth.server.crash_guard import CrashGuard, RequestRefused, fingerprint


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_request_is_refused_after_its_deaths_and_forgiven_after_the_window() -> None:
    clock = Clock()
    guard = CrashGuard(clock)
    killer = fingerprint("generate", {"prompt": "x", "images": [b"\x00"]})
    for _ in range(crash_guard.REQUEST_LIMIT):
        guard.check("m", "key alice", killer, "r1")
        guard.record("m", "key alice", killer, "r1")
    with pytest.raises(RequestRefused, match="refused for now"):
        guard.check("m", "key bob", killer, "r2")  # the same request, whoever sends it
    guard.check("m", "key bob", fingerprint("generate", {"prompt": "y"}), "r3")  # others pass
    clock.now += crash_guard.WINDOW + 1
    guard.check("m", "key bob", killer, "r4")


def test_a_client_that_keeps_killing_a_model_is_refused_on_that_model_only() -> None:
    guard = CrashGuard(Clock())
    for attempt in range(crash_guard.CLIENT_LIMIT):
        guard.record("m", "key mallory", fingerprint("generate", {"prompt": str(attempt)}), "r")
    with pytest.raises(RequestRefused, match="refuses them"):
        guard.check("m", "key mallory", fingerprint("generate", {"prompt": "new"}), "r")
    guard.check("other", "key mallory", fingerprint("generate", {"prompt": "new"}), "r")
    guard.check("m", "key alice", fingerprint("generate", {"prompt": "new"}), "r")


def test_fingerprints_tell_requests_apart() -> None:
    assert fingerprint("generate", {"a": 1, "b": [2]}) == fingerprint("generate", {"b": [2], "a": 1})
    assert fingerprint("generate", {"a": 1}) != fingerprint("embed", {"a": 1})
    assert fingerprint("generate", {"images": [b"1"]}) != fingerprint("generate", {"images": [b"2"]})


def test_memory_stays_bounded() -> None:
    clock = Clock()
    guard = CrashGuard(clock)
    for index in range(crash_guard.MAX_TRACKED):
        guard.record("m", f"client {index}", str(index), "r")
    clock.now += crash_guard.WINDOW + 1
    guard.record("m", "late", "late", "r")
    assert len(guard._by_request) == 1 and len(guard._by_client) == 1  # noqa: SLF001


def test_deaths_on_record() -> None:
    guard = CrashGuard(Clock())
    assert not guard.has_deaths()
    guard.record("m", "local", fingerprint("generate", {"prompt": "x"}), "r")
    assert guard.has_deaths()
