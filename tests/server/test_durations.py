"""keep_alive and Go duration parsing, as Ollama reads them."""

from __future__ import annotations

import math

import pytest

from berth.registry.errors import InvalidInput
from berth.server.durations import FOREVER, parse_env_keep_alive, parse_go_duration, parse_keep_alive


@pytest.mark.parametrize(
    "text,seconds",
    [("5m", 300), ("1h30m", 5400), ("300ms", 0.3), ("0", 0), ("1.5h", 5400), ("2h45m30.5s", 9930.5),
     ("-1m", -60), ("+10s", 10), ("1us", 1e-6), ("1µs", 1e-6), ("10ns", 1e-8)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert math.isclose(parse_go_duration(text), seconds)


@pytest.mark.parametrize("text,message", [("300", "missing unit"), ("-1", "missing unit"), ("", "invalid duration"),
                                          ("5x", "invalid duration"), ("m", "invalid duration"),
                                          ("1h x", "invalid duration")])
def test_bad_go_durations(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_go_duration(text)


@pytest.mark.parametrize(
    "value,expected",
    [(None, 123.0), (0, 0.0), (30, 30.0), (2.5, 2.5), (-1, FOREVER), ("-1m", FOREVER), ("10m", 600.0), ("0", 0.0)],
)
def test_keep_alive_values(value: object, expected: float) -> None:
    assert parse_keep_alive(value, default=123.0) == expected


@pytest.mark.parametrize("value", [True, [1], {"a": 1}, "300"])
def test_keep_alive_rejects_other_types(value: object) -> None:
    with pytest.raises(InvalidInput):
        parse_keep_alive(value, default=1.0)


def test_env_keep_alive_takes_bare_seconds_and_durations() -> None:
    assert parse_env_keep_alive(None) == 300.0
    assert parse_env_keep_alive("") == 300.0
    assert parse_env_keep_alive("60") == 60.0
    assert parse_env_keep_alive("1h") == 3600.0
    assert parse_env_keep_alive("-1") == FOREVER
