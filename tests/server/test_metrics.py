"""Prometheus metrics and request ids, read from a live server."""

from __future__ import annotations

import re

import httpx

from berth.registry.default_model import DEFAULT_MODEL_NAME
from tests.conftest import BerthServer


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:{{(.*)}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def test_metrics_count_requests_tokens_and_loads(fresh_server: BerthServer) -> None:
    with httpx.Client(base_url=fresh_server.url, timeout=120) as http:
        http.post("/api/generate", json={"model": DEFAULT_MODEL_NAME, "prompt": "Hi", "stream": False,
                                         "options": {"num_predict": 3, "temperature": 0}})
        http.get("/api/no-such-path")
        text = http.get("/metrics").text
    assert sample(text, "berth_requests_total", route="/api/generate", method="POST", status="200") == 1
    assert sample(text, "berth_requests_total", route="unmatched", method="GET", status="404") == 1
    assert sample(text, "berth_tokens_total", direction="generated", model=DEFAULT_MODEL_NAME) == 3
    assert sample(text, "berth_tokens_total", direction="prompt", model=DEFAULT_MODEL_NAME) > 0
    assert sample(text, "berth_time_to_first_token_seconds_count", model=DEFAULT_MODEL_NAME) == 1
    assert sample(text, "berth_model_load_seconds_count", model=DEFAULT_MODEL_NAME) == 1
    assert sample(text, "berth_loaded_models") == 1
    assert sample(text, "berth_queue_depth") == 0


def test_request_ids_are_echoed_or_made(http: httpx.Client) -> None:
    assert http.get("/api/version", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = http.get("/api/version").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", made)


def test_registry_bytes_are_counted(fresh_server: BerthServer, registry) -> None:  # type: ignore[no-untyped-def]
    target = f"{registry.host}/team/gemma:1"
    with httpx.Client(base_url=fresh_server.url, timeout=300) as http:
        http.post("/api/copy", json={"source": DEFAULT_MODEL_NAME, "destination": target})
        manifest_size = sum(m["size"] for m in http.get("/api/tags").json()["models"] if m["name"] == target)
        assert http.post("/api/push", json={"model": target, "insecure": True, "stream": False}).status_code == 200
        pushed = sample(http.get("/metrics").text, "berth_registry_bytes_total", direction="push")
        http.request("DELETE", "/api/delete", json={"model": target})
        http.request("DELETE", "/api/delete", json={"model": DEFAULT_MODEL_NAME})
        assert http.post("/api/pull", json={"model": target, "insecure": True, "stream": False}).status_code == 200
        pulled = sample(http.get("/metrics").text, "berth_registry_bytes_total", direction="pull")
    # Every blob went up once and came back once.
    assert pushed == manifest_size and pulled == manifest_size
