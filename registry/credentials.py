"""Registry logins: `berth login` / `berth logout` storage, with Docker's config as a fallback.

Berth's own file is `$BERTH_HOME/credentials.json` (default `~/.berth/credentials.json`), written
0600 through a temporary file and a rename, so a crash never leaves a half-written file and other
users never see a password. Its shape is Docker's (`{"auths": {host: {"auth": base64(user:pass)}}}`)
so people can read it the way they already read `~/.docker/config.json`, which is consulted when
Berth has no entry for a host (only its `auths`; credential helpers are not run).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from berth.registry.errors import CorruptData, InvalidInput

CREDENTIALS_FILE = "credentials.json"
# A credentials file is a few hundred bytes; a huge one is not ours.
MAX_CREDENTIALS_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Credential:
    username: str
    password: str

    def __repr__(self) -> str:  # never print a password into a log or a traceback
        return f"Credential(username={self.username!r}, password=***)"

    def basic_header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"


def berth_home(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("BERTH_HOME") or Path.home() / ".berth").expanduser()


def normalize_host(registry: str) -> str:
    """`https://Host:5000/` and `host:5000` are the same key; refuse anything that is not a host."""
    text = registry.strip()
    for prefix in ("https://", "http://"):
        if text.lower().startswith(prefix):
            text = text[len(prefix):]
    text = text.rstrip("/").lower()
    if not text or "/" in text or any(ch.isspace() for ch in text) or "@" in text:
        raise InvalidInput(f"invalid registry {registry!r}: expected a host such as registry.example.com:5000")
    return text


class CredentialStore:
    """Berth's credentials file plus Docker's, read-only, as a fallback."""

    def __init__(self, path: Path | None = None, docker_config: Path | None = None) -> None:
        self.path = path or berth_home() / CREDENTIALS_FILE
        docker_dir = os.environ.get("DOCKER_CONFIG")
        self.docker_config = docker_config or (
            Path(docker_dir) / "config.json" if docker_dir else Path.home() / ".docker" / "config.json")

    def get(self, registry: str) -> Credential | None:
        host = normalize_host(registry)
        for source in (self.path, self.docker_config):
            found = _lookup(_read(source), host)
            if found is not None:
                return found
        return None

    def save(self, registry: str, credential: Credential) -> None:
        host = normalize_host(registry)
        if not credential.username or ":" in credential.username:
            raise InvalidInput("the username must be non-empty and may not contain ':'")
        doc = _read(self.path)
        auths = doc.setdefault("auths", {})
        token = base64.b64encode(f"{credential.username}:{credential.password}".encode()).decode()
        auths[host] = {"auth": token}
        self._write(doc)

    def remove(self, registry: str) -> bool:
        """Forget a login; True if there was one in Berth's file (Docker's file is never changed)."""
        host = normalize_host(registry)
        doc = _read(self.path)
        auths = doc.get("auths") or {}
        if host not in auths:
            return False
        del auths[host]
        self._write(doc)
        return True

    def _write(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, temp = tempfile.mkstemp(prefix=".credentials-", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)  # before any byte is written
            with os.fdopen(fd, "w") as handle:
                json.dump(doc, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CREDENTIALS_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    if len(raw) > MAX_CREDENTIALS_BYTES:
        raise CorruptData(f"{path} is larger than {MAX_CREDENTIALS_BYTES} bytes; it is not a credentials file")
    try:
        doc = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise CorruptData(f"{path} is not valid JSON ({exc}); fix or remove it and log in again") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("auths", {}), dict):
        raise CorruptData(f"{path} does not have the expected {{\"auths\": {{...}}}} shape; fix or remove it")
    return doc


def _lookup(doc: dict[str, Any], host: str) -> Credential | None:
    for key, entry in (doc.get("auths") or {}).items():
        try:
            if normalize_host(key) != host:
                continue
        except InvalidInput:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("auth"), str):
            continue
        try:
            decoded = base64.b64decode(entry["auth"], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            continue
        username, sep, password = decoded.partition(":")
        if sep and username:
            return Credential(username, password)
    return None
