"""`keep_alive` values and Go duration strings, exactly as Ollama reads them.

A JSON number is seconds (fractions allowed); a string is a Go duration (`5m`, `1h30m`, `300ms`,
`-1m`, `0`); anything negative means "forever"; a unit-less string other than "0" is an error.
"""

from __future__ import annotations

import math
import re

from berth.registry.errors import InvalidInput

FOREVER = math.inf
# Go's time.Duration holds at most 2**63 - 1 nanoseconds (about 292 years); Ollama cannot take more.
MAX_SECONDS = (2**63 - 1) / 1e9

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"([0-9]*\.?[0-9]*)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string; raises InvalidInput with Go's wording."""
    original = text
    sign = 1.0
    if text and text[0] in "+-":
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise InvalidInput(f'time: invalid duration "{original}"')
    total = 0.0
    position = 0
    while position < len(text):
        match = _PART.match(text, position)
        if not match or match.group(1) in ("", "."):
            if re.fullmatch(r"[0-9.]+", text[position:]):
                raise InvalidInput(f'time: missing unit in duration "{original}"')
            raise InvalidInput(f'time: invalid duration "{original}"')
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    return sign * total


def parse_keep_alive(value: object, default: float) -> float:
    """Seconds to keep a model loaded after its last request; `FOREVER` for negative values."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise InvalidInput("keep_alive: Unsupported type bool; use a number of seconds or a duration like \"5m\"")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_go_duration(value.strip())
    else:
        raise InvalidInput(f"keep_alive: Unsupported type {type(value).__name__}; use seconds or a duration like \"5m\"")
    return _keep_alive_seconds(seconds, value)


def parse_env_keep_alive(value: str | None) -> float:
    """BERTH_KEEP_ALIVE: a duration or a bare number of seconds; default five minutes."""
    if not value or not value.strip():
        return 300.0
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = parse_go_duration(text)
    return _keep_alive_seconds(seconds, value)


def _keep_alive_seconds(seconds: float, value: object) -> float:
    if not abs(seconds) <= MAX_SECONDS:  # also NaN
        raise InvalidInput(f"keep_alive: {value!r} is longer than a duration can be (about 292 years); "
                           "use a negative value to keep the model loaded for ever")
    return FOREVER if seconds < 0 else seconds
