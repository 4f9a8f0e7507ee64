"""Refusing requests that keep killing runners.

Every value is checked before it reaches llama.cpp, but a runner can still die on a request
(a fault no check foresaw, a hostile model). The scheduler starts a fresh runner for the next
request; without a guard the same request, sent again and again, would keep the model down for
everyone. So each death that interrupts requests is recorded against what was in flight:

* the request itself, by a fingerprint of what the runner was sent (prompt, options, format,
  images): one that was in flight at REQUEST_LIMIT deaths is refused for WINDOW;
* the client (its API key, or its address where no key is used) on that model: one whose
  requests were in flight at CLIENT_LIMIT deaths is refused that model for WINDOW.

A batched runner serves several requests at once, so a death is also counted against the
requests and clients that were only beside the one that caused it; the limits leave room for
that (a bystander is rarely beside the same killer twice). Refusals are logged with the request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Callable

from berth.registry.errors import BerthError

log = logging.getLogger("berth.crash_guard")

WINDOW = 600.0  # seconds a death counts
REQUEST_LIMIT = 2  # deaths the same request may be in flight at
CLIENT_LIMIT = 3  # deaths one client's requests to one model may be in flight at
MAX_TRACKED = 4096  # requests and clients remembered; beyond it, those with no recent death are forgotten


@dataclass(frozen=True)
class Caller:
    """Who sent a request (an API key's name, or an address) and the request's id, for logs."""

    client: str = "local"
    request_id: str = "-"


class RequestRefused(BerthError):
    """A request, or a client on a model, that kept killing runners is turned away for a while."""


def fingerprint(op: str, payload: dict[str, Any]) -> str:
    """What identifies a request to a runner: its operation and everything it was sent."""
    encoded = json.dumps({"op": op, **payload}, sort_keys=True, default=_bytes_digest).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def _bytes_digest(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha256(value).hexdigest()
    raise TypeError(f"cannot fingerprint a {type(value).__name__}")


class CrashGuard:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._by_request: defaultdict[str, deque[float]] = defaultdict(deque)
        self._by_client: defaultdict[tuple[str, str], deque[float]] = defaultdict(deque)

    def has_deaths(self) -> bool:
        """Whether any death is on record: until one is, no request can be refused as a killer,
        so callers need not fingerprint their requests."""
        with self._lock:
            return bool(self._by_request)

    def check(self, model: str, client: str, request: str, request_id: str) -> None:
        """RequestRefused when this request, or this client on this model, kept killing runners."""
        with self._lock:
            request_deaths = self._recent(self._by_request, request)
            client_deaths = self._recent(self._by_client, (model, client))
        if request_deaths >= REQUEST_LIMIT:
            log.warning("refused request %s from %s to %s: the same request (fingerprint %s) was in flight when "
                        "its runner died %d times", request_id, client, model, request, request_deaths)
            raise RequestRefused(
                f"this request was being served when the runner for {model} died {request_deaths} times in the last "
                f"{WINDOW / 60:.0f} minutes, so it is refused for now; change it, or tell the server's operator")
        if client_deaths >= CLIENT_LIMIT:
            log.warning("refused request %s from %s to %s: its requests were in flight when the runner died %d times",
                        request_id, client, model, client_deaths)
            raise RequestRefused(
                f"your requests were being served when the runner for {model} died {client_deaths} times in the last "
                f"{WINDOW / 60:.0f} minutes, so {model} refuses them for now; tell the server's operator")

    def record(self, model: str, client: str, request: str, request_id: str) -> None:
        """A runner died while this request was in flight."""
        now = self._clock()
        with self._lock:
            for table in (self._by_request, self._by_client):
                if len(table) >= MAX_TRACKED:
                    for key in list(table):
                        self._recent(table, key)
            self._by_request[request].append(now)
            self._by_client[(model, client)].append(now)
        log.warning("the runner for %s died serving request %s from %s (fingerprint %s)",
                    model, request_id, client, request)

    def _recent(self, table: defaultdict[Any, deque[float]], key: Any) -> int:
        """Deaths of `key` within WINDOW, dropping older ones (and the key once it has none)."""
        if key not in table:
            return 0
        times = table[key]
        cutoff = self._clock() - WINDOW
        while times and times[0] < cutoff:
            times.popleft()
        if not times:
            del table[key]
        return len(times)
