"""Ollama's registry token requests, signed with the user's ed25519 key
(docs/ollama-compatibility.md, "Registry authentication").

On a `401` with `Bearer realm=…`, Ollama asks the realm for a token with:

* URL = the realm plus query `nonce` (16 random bytes, base64url, no padding), one `scope` per
  space-separated scope, `service`, `ts` (unix seconds), the realm's own query kept, every key
  sorted as Go's `url.Values.Encode` does;
* string to sign = `GET,<that URL>,<base64(hex(sha256(empty body)))>`;
* header `Authorization: <public key blob>:<base64 signature>`, the blob being the base64 SSH wire
  form of the public key (second field of `id_ed25519.pub`), the signature the raw 64 bytes.

The realm-host check (CVE-2025-51471) happens before any of this, in registry/oci.py. Signing is
used only for the registries listed in `hosts` (Ollama's by default) that have no stored login, so
other registries' anonymous token endpoints never see an unexpected header or our public key.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from berth.registry.user_key import KeyHolder, b64

OLLAMA_REGISTRIES = frozenset({"registry.ollama.ai", "ollama.com"})
# base64(hex(sha256(b""))): token requests have no body.
EMPTY_BODY_DIGEST = base64.b64encode(hashlib.sha256(b"").hexdigest().encode()).decode()


class RequestSigner(Protocol):
    """Signs registry token requests for the hosts it covers."""

    def covers(self, host: str) -> bool: ...

    def token_url(self, realm: str, service: str, scope: str) -> str: ...

    def authorization(self, method: str, url: str) -> str: ...


def signed_token_url(realm: str, service: str, scope: str, now: float, nonce: bytes) -> str:
    """The realm URL with Ollama's query, keys sorted like Go's `url.Values.Encode`."""
    parts = urlsplit(realm)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query.append(("nonce", base64.urlsafe_b64encode(nonce).decode().rstrip("=")))
    query.extend(("scope", s) for s in scope.split(" ") if s)
    query.append(("service", service))
    query.append(("ts", str(int(now))))
    query.sort(key=lambda pair: pair[0])  # stable: values of one key keep their order, as in Go
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def string_to_sign(method: str, url: str) -> bytes:
    return f"{method},{url},{EMPTY_BODY_DIGEST}".encode()


class OllamaKeySigner:
    """The user's key (created under the Berth home on first use) signing Ollama token requests."""

    def __init__(self, home: Path, hosts: Iterable[str] = OLLAMA_REGISTRIES,
                 clock: Callable[[], float] = time.time) -> None:
        self.keys = KeyHolder(home)
        self.hosts = frozenset(h.lower() for h in hosts)
        self._clock = clock

    def covers(self, host: str) -> bool:
        return host.lower() in self.hosts

    def token_url(self, realm: str, service: str, scope: str) -> str:
        return signed_token_url(realm, service, scope, self._clock(), os.urandom(16))

    def authorization(self, method: str, url: str) -> str:
        key = self.keys.get()
        return f"{key.public_blob()}:{b64(key.sign(string_to_sign(method, url)))}"
