"""Prometheus metrics and request logging.

The registry of metrics belongs to the app (no process-global collectors), so tests and several
apps in one process stay independent. Route labels are route templates (`/api/show`), never raw
paths, so a client cannot blow up the number of series.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from berth.server.guard import ASGIApp, Receive, Scope, Send

log = logging.getLogger("berth.access")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("berth_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.request_seconds = Histogram("berth_request_duration_seconds", "HTTP request duration by route",
                                         ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("berth_tokens", "Tokens processed, by direction (prompt or generated) and model",
                              ["direction", "model"], registry=self.registry)
        self.first_token_seconds = Histogram("berth_time_to_first_token_seconds",
                                             "From request start to the first generated token",
                                             ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.load_seconds = Histogram("berth_model_load_seconds", "Time to start a runner and load a model",
                                      ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("berth_queue_depth", "Requests waiting for a model to load",
                                 registry=self.registry)
        self.loaded_models = Gauge("berth_loaded_models", "Models loaded in runner processes",
                                   registry=self.registry)
        self.transfer_bytes = Counter("berth_registry_bytes", "Blob bytes moved by finished pulls and pushes",
                                      ["direction"], registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def generation(self, model: str, done: dict[str, Any], first_token_seconds: float | None) -> None:
        self.tokens.labels("prompt", model).inc(int(done.get("prompt_eval_count", 0)))
        self.tokens.labels("generated", model).inc(int(done.get("eval_count", 0)))
        if first_token_seconds is not None:
            self.first_token_seconds.labels(model).observe(first_token_seconds)


class MetricsMiddleware:
    """Counts and times every request, and logs it with a request id (echoed as X-Request-ID)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming[:64] if incoming.isprintable() and incoming else secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id  # for logs that name the request
        status = 500
        started = time.perf_counter()

        async def send_tracked(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": list(message.get("headers", []))
                           + [(b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(template, scope["method"], str(status)).inc()
            self.metrics.request_seconds.labels(template).observe(elapsed)
            log.info("request_id=%s method=%s path=%s status=%d duration_ms=%.1f", request_id, scope["method"],
                     scope["path"], status, elapsed * 1000)
