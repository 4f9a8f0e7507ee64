"""DNS-rebinding and CORS checks against a live server bound to loopback."""

from __future__ import annotations

import httpx
import pytest

from berth.server.guard import BUILTIN_ORIGINS, host_is_local, origin_allowed, parse_origins
from tests.conftest import BerthServer


@pytest.mark.parametrize("host", ["127.0.0.1:11434", "localhost", "[::1]:11434", "10.1.2.3", "192.168.1.9:80",
                                  "0.0.0.0", "box.local", "app.localhost", "svc.internal", "my-host"])
def test_local_hosts(host: str) -> None:
    assert host_is_local(host, ["my-host"])


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:11434", "8.8.8.8", "localhost.evil.com"])
def test_foreign_hosts(host: str) -> None:
    assert not host_is_local(host, ["my-host"])


def test_origins() -> None:
    assert origin_allowed("http://localhost:3000", BUILTIN_ORIGINS)
    assert origin_allowed("vscode-webview://abc", BUILTIN_ORIGINS)
    assert not origin_allowed("https://evil.example.com", BUILTIN_ORIGINS)
    assert origin_allowed("https://ui.example.com", parse_origins("https://*.example.com"))


def test_a_rebound_host_header_is_refused(http: httpx.Client) -> None:
    assert http.get("/api/tags", headers={"Host": "evil.example.com"}).status_code == 403
    assert http.get("/api/tags", headers={"Host": "localhost:11434"}).status_code == 200


def test_cors(server: BerthServer, http: httpx.Client) -> None:
    response = http.get("/api/version", headers={"Origin": "http://localhost:3000"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    preflight = http.options("/api/chat", headers={"Origin": "http://127.0.0.1:8080",
                                                   "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 204 and "POST" in preflight.headers["access-control-allow-methods"]
    assert http.get("/api/version", headers={"Origin": "https://evil.example.com"}).status_code == 403
