"""`BERTH_HOST` / `OLLAMA_HOST` parsing, shared by the server (where to bind) and the CLI (where to connect).

Same rules as Ollama: `[scheme://]host[:port][/path]`, scheme defaults to http, the port to
11434 unless the scheme is given (80 for http, 443 for https). Kept free of heavy imports.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit

DEFAULT_PORT = 11434


@dataclass(frozen=True)
class HostAddress:
    scheme: str
    host: str
    port: int
    path: str = ""

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_host(value: str | None) -> HostAddress:
    """Parse a host setting; an empty value means 127.0.0.1:11434."""
    text = (value or "").strip().strip("\"'").strip()
    if not text:
        return HostAddress("http", "127.0.0.1", DEFAULT_PORT)
    scheme_given = "://" in text
    default_port = DEFAULT_PORT
    if scheme_given:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r} in host {value!r}; use http or https")
        default_port = 443 if scheme == "https" else 80
    parts = urlsplit(text if scheme_given else f"http://{text}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid port in host {value!r}") from None
    host = parts.hostname or "127.0.0.1"
    return HostAddress(parts.scheme, host, port or default_port, parts.path.rstrip("/"))


def host_from_env(env: Mapping[str, str] = os.environ) -> HostAddress:
    """BERTH_HOST, falling back to OLLAMA_HOST so existing scripts keep working."""
    return parse_host(env.get("BERTH_HOST") or env.get("OLLAMA_HOST"))


def client_address(address: HostAddress) -> HostAddress:
    """Where a client connects for a bind address: 0.0.0.0 and :: mean this machine."""
    if address.host in ("0.0.0.0", "::"):
        return HostAddress(address.scheme, "127.0.0.1", address.port, address.path)
    return address
