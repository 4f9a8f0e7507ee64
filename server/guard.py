"""Host and Origin checks: the DNS-rebinding defence (CVE-2024-28224) and CORS, as Ollama does them.

- While the server listens on loopback, a request whose `Host` is not a local name or address is
  refused with 403: a web page that rebinds its domain to 127.0.0.1 cannot drive the API.
- A browser request (`Origin` header) from an origin not in the allow-list is refused with 403;
  allowed ones get CORS headers, and preflight OPTIONS requests are answered with 204.
  `BERTH_ORIGINS` adds origins (comma-separated, `*` wildcards) to the built-in local ones.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from typing import Any, Awaitable, Callable, Iterable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BUILTIN_ORIGINS = tuple(
    f"{scheme}://{host}{port}"
    for scheme in ("http", "https")
    for host in ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
    for port in ("", ":*")
) + ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")

ALLOWED_HEADERS = ("Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "OpenAI-Beta",
                   "x-stainless-arch", "x-stainless-async", "x-stainless-custom-poll-interval",
                   "x-stainless-helper-method", "x-stainless-lang", "x-stainless-os",
                   "x-stainless-package-version", "x-stainless-poll-helper", "x-stainless-retry-count",
                   "x-stainless-runtime", "x-stainless-runtime-version", "x-stainless-timeout")
ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")


def parse_origins(value: str | None) -> tuple[str, ...]:
    extra = tuple(o.strip() for o in (value or "").split(",") if o.strip())
    return extra + BUILTIN_ORIGINS


def host_is_local(host_header: str, own_names: Iterable[str]) -> bool:
    """Whether a Host header names this machine: loopback, private or unspecified IPs, its name."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:11434
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if not host or host == "localhost" or host.endswith(LOCAL_SUFFIXES):
        return True
    if host in {name.lower() for name in own_names}:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_unspecified or address.is_link_local


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(origin, pattern) for pattern in allowed)


class GuardMiddleware:
    def __init__(self, app: ASGIApp, *, check_host: bool, origins: tuple[str, ...]) -> None:
        self.app = app
        self.check_host = check_host
        self.origins = origins
        self.own_names = (socket.gethostname(), socket.getfqdn())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.check_host and not host_is_local(headers.get("host", ""), self.own_names):
            await _plain(send, 403, b"")
            return
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        if not origin_allowed(origin, self.origins):
            await _plain(send, 403, b"")
            return
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": cors + [
                (b"access-control-allow-methods", ALLOWED_METHODS.encode()),
                (b"access-control-allow-headers", ", ".join(ALLOWED_HEADERS).encode()),
                (b"access-control-max-age", b"43200")]})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + cors}
            await send(message)

        await self.app(scope, receive, send_with_cors)


async def _plain(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
