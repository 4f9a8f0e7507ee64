"""Download rate caps: `BERTH_MAX_DOWNLOAD_RATE`, `berth pull --max-rate`, the API's `max_rate`.

A cap is a token bucket shared by every chunk thread of the pulls it governs, so eight parallel
ranged streams together stay under it (Ollama users asked for this because parallel parts saturated
shared links: ollama/ollama#2006, #4371). Rates are bytes per second written like `50M`: the
suffixes K, M, G are powers of 1000 and Ki, Mi, Gi powers of 1024; a trailing `B` or `/s` is
allowed (`50MB/s`, `1.5Mi`).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Callable

from berth.registry.errors import InvalidInput

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?(?:/s)?\s*$", re.IGNORECASE)
# The bucket holds at most this much time's worth of bytes: enough to absorb one socket read of a
# few hundred KiB at low rates, small enough that a pause does not turn into a long burst.
BURST_SECONDS = 0.25
MIN_BURST = 256 * 1024


def parse_rate(text: str | None) -> int | None:
    """Bytes per second from `50M`, `1.5MiB/s`, `800k`; None for empty or `0` (no cap)."""
    if text is None or not str(text).strip():
        return None
    found = _RATE.match(str(text))
    if not found:
        raise InvalidInput(f"invalid rate {text!r}: expected a number of bytes per second such as 50M or 1.5Mi")
    value = float(found.group(1)) * _UNITS[(found.group(2) or "").lower()]
    return int(value) if value >= 1 else None


class RateLimiter:
    """A token bucket of bytes; `consume` blocks the calling thread until its bytes fit the rate."""

    def __init__(self, bytes_per_second: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if bytes_per_second <= 0:
            raise InvalidInput("a rate cap must be positive")
        self.rate = bytes_per_second
        self.capacity = max(MIN_BURST, int(bytes_per_second * BURST_SECONDS))
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(self.capacity)
        self._updated = clock()

    def consume(self, amount: int, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Take `amount` bytes from the bucket, going into debt and sleeping it off.

        Debt (rather than waiting for the full amount to accumulate) keeps reads larger than the
        bucket from blocking forever; the sleep happens outside the lock so other threads proceed.
        """
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            self._tokens -= amount
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        # Sleep in short steps so a cancelled pull does not sit out a long debt.
        while wait > 0 and not cancelled():
            step = min(wait, 0.2)
            self._sleep(step)
            wait -= step
