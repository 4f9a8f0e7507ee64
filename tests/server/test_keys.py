"""API keys: scopes, revocation, and the clients that send them (CLI, ollama, openai)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from berth.registry.default_model import DEFAULT_MODEL_NAME
from berth.registry.keys import KeyStore, parse_scope
from berth.registry.library import Library
from berth.server.address import parse_host
from berth.server.auth import required_scope
from berth.server.settings import Settings
from tests.conftest import BerthServer, berth_executable, start_server


@pytest.mark.parametrize("method,path,scope", [
    ("GET", "/", None), ("GET", "/api/tags", "read"), ("POST", "/api/chat", "read"), ("GET", "/v1/models", "read"),
    ("POST", "/api/pull", "write"), ("POST", "/api/push", "write"), ("POST", "/api/create", "write"),
    ("POST", "/api/copy", "write"), ("DELETE", "/api/delete", "write"), ("POST", "/api/blobs/sha256:x", "write"),
    ("POST", "/api/keys", "admin"), ("GET", "/api/keys", "admin"),
])
def test_required_scopes(method: str, path: str, scope: str | None) -> None:
    assert required_scope(method, path) == scope


def test_when_keys_are_required() -> None:
    loopback = Settings(host=parse_host("127.0.0.1:11434"), models_dir=Path("/x"))
    everywhere = Settings(host=parse_host("0.0.0.0:11434"), models_dir=Path("/x"))
    assert not loopback.keys_required
    assert everywhere.keys_required
    assert not Settings(host=everywhere.host, models_dir=Path("/x"), no_auth=True).keys_required
    assert Settings(host=loopback.host, models_dir=Path("/x"), loopback_needs_key=True).keys_required


def test_scope_parsing() -> None:
    assert parse_scope("read") == "read"
    assert parse_scope("read,write") == "write"
    with pytest.raises(Exception, match="invalid scope"):
        parse_scope("root")


@pytest.fixture
def locked_server(tmp_path: Path) -> BerthServer:
    srv = start_server(tmp_path / "models", tmp_path / "server.log", {"BERTH_LOOPBACK_AUTH": "1"})
    yield srv
    srv.stop()


def admin_key(server: BerthServer) -> str:
    library = Library(server.models_dir)
    try:
        secret, _ = KeyStore(library).create("admin", "admin")
    finally:
        library.close()
    return secret


def test_keys_gate_the_api_by_scope(locked_server: BerthServer) -> None:
    url = locked_server.url
    assert httpx.get(url + "/").status_code == 200  # health needs no key
    missing = httpx.get(url + "/api/tags")
    assert missing.status_code == 401 and "API key is needed" in missing.json()["error"]
    assert httpx.get(url + "/api/tags", headers={"Authorization": "Bearer berth_wrong"}).status_code == 401

    admin = {"Authorization": f"Bearer {admin_key(locked_server)}"}
    made = httpx.post(url + "/api/keys", json={"name": "alice", "scope": "read"}, headers=admin).json()
    reader = {"Authorization": f"Bearer {made['key']}"}
    assert made["scope"] == "read" and made["key"].startswith("berth_")

    assert httpx.get(url + "/api/tags", headers=reader).status_code == 200
    assert httpx.post(url + "/api/show", json={"model": DEFAULT_MODEL_NAME}, headers=reader).status_code == 200
    for method, path, body in [("POST", "/api/copy", {"source": DEFAULT_MODEL_NAME, "destination": "x:1"}),
                               ("DELETE", "/api/delete", {"model": DEFAULT_MODEL_NAME}),
                               ("POST", "/api/create", {"model": "x:1", "from": DEFAULT_MODEL_NAME}),
                               ("POST", "/api/push", {"model": DEFAULT_MODEL_NAME}),
                               ("POST", "/api/keys", {"name": "bob"})]:
        denied = httpx.request(method, url + path, json=body, headers=reader)
        assert denied.status_code == 403, path
        assert "has scope read" in denied.json()["error"]
    assert DEFAULT_MODEL_NAME in [m["name"] for m in httpx.get(url + "/api/tags", headers=reader).json()["models"]]

    listed = httpx.get(url + "/api/keys", headers=admin).json()["keys"]
    assert {k["name"] for k in listed} == {"admin", "alice"}
    assert all("key" not in k for k in listed)  # secrets are never shown again
    assert httpx.request("DELETE", url + "/api/keys", json={"name": "alice"}, headers=admin).status_code == 200
    revoked = httpx.get(url + "/api/tags", headers=reader)
    assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]


def test_clients_send_keys(locked_server: BerthServer) -> None:
    key = admin_key(locked_server)
    env = {**locked_server.env(), "BERTH_API_KEY": key}
    listed = subprocess.run([berth_executable(), "list"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and DEFAULT_MODEL_NAME in listed.stdout
    env.pop("BERTH_API_KEY")
    refused = subprocess.run([berth_executable(), "list"], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "API key is needed" in refused.stderr
    made = subprocess.run([berth_executable(), "keys", "create", "--name", "ci", "--scope", "read"],
                          env={**env, "BERTH_API_KEY": key}, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and made.stdout.strip().startswith("berth_")
    client = openai.OpenAI(base_url=locked_server.url + "/v1", api_key=made.stdout.strip())
    assert DEFAULT_MODEL_NAME in [m.id for m in client.models.list().data]
    import ollama

    native = ollama.Client(host=locked_server.url, headers={"Authorization": f"Bearer {made.stdout.strip()}"})
    assert native.list().models


async def _through_auth(headers: list[tuple[bytes, bytes]], required: bool) -> int:
    """The status AuthMiddleware gives a loopback request with `headers` (200: passed on)."""
    from berth.server.auth import AuthMiddleware

    statuses: list[int] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        statuses.append(200)

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    middleware = AuthMiddleware(app, keys=None, required=required, loopback_needs_key=False)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "GET", "path": "/api/tags", "client": ("127.0.0.1", 40000), "headers": headers}
    await middleware(scope, None, send)  # type: ignore[arg-type]
    return statuses[0]


@pytest.mark.parametrize("header", [b"x-forwarded-for", b"x-real-ip", b"forwarded"])
def test_a_request_relayed_by_a_proxy_is_not_a_local_client(header: bytes) -> None:
    import asyncio

    assert asyncio.run(_through_auth([], required=True)) == 200  # a local client needs no key
    assert asyncio.run(_through_auth([(header, b"203.0.113.9")], required=True)) == 401


def test_a_loopback_server_without_keys_warns_once_about_a_proxy(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from berth.server.auth import AuthMiddleware

    async def app(scope: dict, receive: object, send: object) -> None:
        pass

    middleware = AuthMiddleware(app, keys=None, required=False, loopback_needs_key=False)  # type: ignore[arg-type]
    relayed = {"type": "http", "method": "GET", "path": "/api/tags", "client": ("127.0.0.1", 1),
               "headers": [(b"x-forwarded-for", b"203.0.113.9")]}
    with caplog.at_level("WARNING", logger="berth.auth"):
        for _ in range(3):
            asyncio.run(middleware(dict(relayed), None, None))  # type: ignore[arg-type]
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "relayed to this server by a proxy" in caplog.records[0].message


def test_a_live_key_name_is_a_conflict_and_a_revoked_one_is_free(locked_server: BerthServer) -> None:
    url = locked_server.url
    admin = {"Authorization": f"Bearer {admin_key(locked_server)}"}
    assert httpx.post(url + "/api/keys", json={"name": "carol"}, headers=admin).status_code == 200
    again = httpx.post(url + "/api/keys", json={"name": "carol"}, headers=admin)
    assert again.status_code == 409 and "revoke it first" in again.json()["error"]
    assert httpx.request("DELETE", url + "/api/keys", json={"name": "carol"}, headers=admin).status_code == 200
    remade = httpx.post(url + "/api/keys", json={"name": "carol", "scope": "write"}, headers=admin)
    assert remade.status_code == 200 and remade.json()["scope"] == "write"
