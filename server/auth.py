"""API-key checks for a shared host.

Keys are required when the server listens beyond loopback (unless started with `--no-auth`);
requests from this machine's loopback pass without one (so the operator can make the first key)
unless BERTH_LOOPBACK_AUTH is set. Where no key is required none is checked, since OpenAI
clients always send one. They send keys the same way as the CLI (`Authorization: Bearer ...`).

A request that arrives over loopback but carries a proxy's forwarding header (`Forwarded`,
`X-Forwarded-For`, `X-Real-IP`) was relayed for someone else: it is not a local client, so it
needs a key wherever keys are required. A server on loopback without keys cannot tell who is
behind the proxy; it serves them (that is its configuration) and says so once in its log.

Who asked is kept in the request's state as `client` (the key's name, or `local`/`anonymous`
and the address), for the runner crash guard.
"""

from __future__ import annotations

import ipaddress
import json
import logging

from berth.registry.keys import KeyStore
from berth.server.guard import ASGIApp, Receive, Scope, Send

log = logging.getLogger("berth.auth")

_FORWARDING_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip")
_WRITE_PATHS = ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs/", "/api/handoff")


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


def is_proxied(scope: Scope) -> bool:
    """Whether a proxy relayed the request (it names the client it relayed for)."""
    return any(key in _FORWARDING_HEADERS for key, _ in scope.get("headers", []))


def is_local_client(scope: Scope) -> bool:
    """A process on this machine talking to the server directly: over loopback, not relayed."""
    return _is_loopback(scope) and not is_proxied(scope)


def _client_label(scope: Scope, key_name: str | None) -> str:
    if key_name is not None:
        return f"key {key_name}"
    client = scope.get("client")
    address = client[0] if client else "unknown"
    return f"local {address}" if is_local_client(scope) else f"anonymous {address}"


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
        self._warned_proxy = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = required_scope(scope["method"], scope["path"])
        exempt = is_local_client(scope) and not self.loopback_needs_key
        if needed is None or not self.required or exempt:
            # No key is needed here, so none is checked: OpenAI clients always send some key
            # ("ollama", "none"...), and those must keep working against a local server.
            if not self.required and not self._warned_proxy and is_proxied(scope) and _is_loopback(scope):
                self._warned_proxy = True
                log.warning("requests are being relayed to this server by a proxy, and it needs no API keys: "
                            "everyone who can reach the proxy can use it. Listen beyond loopback (keys are "
                            "then required) or set BERTH_LOOPBACK_AUTH=1, and make keys with `berth keys create`")
            scope.setdefault("state", {})["client"] = _client_label(scope, None)
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
        scope.setdefault("state", {})["client"] = _client_label(scope, key.name)
        await self.app(scope, receive, send)


async def _deny(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="berth"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
