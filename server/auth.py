"""API-key checks for a shared host.

Keys are required when the server listens beyond loopback (unless started with `--no-auth`);
requests from this machine's loopback pass without one (so the operator can make the first key)
unless BERTH_LOOPBACK_AUTH is set. Where no key is required none is checked, since OpenAI
clients always send one. They send keys the same way as the CLI (`Authorization: Bearer ...`).
"""

from __future__ import annotations

import ipaddress
import json
from registry.keys import KeyStore
from server.guard import ASGIApp, Receive, Scope, Send

_WRITE_PATHS = ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs/")


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs; None for the health check."""
    if path == "/" or method == "OPTIONS":
        return None
    if path.startswith("/api/keys"):
        return "admin"
    if path.startswith(_WRITE_PATHS):
        return "write"
    return "read"


def _is_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


def _bearer(scope: Scope) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"authorization":
            text = value.decode("latin-1").strip()
            if text.lower().startswith("bearer "):
                return text[7:].strip()
            return text
    return None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, keys: KeyStore, required: bool, loopback_needs_key: bool) -> None:
        self.app = app
        self.keys = keys
        self.required = required
        self.loopback_needs_key = loopback_needs_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = required_scope(scope["method"], scope["path"])
        exempt = _is_loopback(scope) and not self.loopback_needs_key
        if needed is None or not self.required or exempt:
            # No key is needed here, so none is checked: OpenAI clients always send some key
            # ("ollama", "none"...), and those must keep working against a local server.
            await self.app(scope, receive, send)
            return
        secret = _bearer(scope)
        if secret is None:
            await _deny(send, 401, "an API key is needed: set BERTH_API_KEY for the berth CLI, or send "
                                   "'Authorization: Bearer <key>'; an admin makes keys with `berth keys create`")
            return
        key = self.keys.verify(secret)
        if key is None:
            await _deny(send, 401, "invalid API key: it is unknown or was revoked")
            return
        if not key.allows(needed):
            await _deny(send, 403, f"the API key {key.name!r} has scope {key.scope}; this request needs {needed}")
            return
        await self.app(scope, receive, send)


async def _deny(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="berth"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
