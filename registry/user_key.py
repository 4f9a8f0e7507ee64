"""The user's ed25519 key: Ollama-style registry auth (registry/ollama_auth.py) and model signatures.

Stored as `$BERTH_HOME/id_ed25519` (OpenSSH private key format, unencrypted, 0600) and
`id_ed25519.pub` (an authorized_keys line, `ssh-ed25519 AAAA… berth`), the same files and formats
as Ollama's `~/.ollama/id_ed25519`, so `ssh-keygen -y -f` and other OpenSSH tools read them. The key
is created on first use; creation goes through a temporary file and `link`, which fails if another
process got there first, so two servers starting at once end up with one key.
"""

from __future__ import annotations

import base64
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from berth.registry.errors import CorruptData

KEY_FILE = "id_ed25519"
SIGNING_KEY_ENV = "BERTH_SIGNING_KEY"
KEY_COMMENT = "berth"


@dataclass(frozen=True)
class UserKey:
    private: Ed25519PrivateKey
    path: Path

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    def public_line(self) -> str:
        """`ssh-ed25519 AAAA…` (OpenSSH authorized_keys format), what `berth key` prints."""
        return self.public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()

    def public_blob(self) -> str:
        """The base64 SSH wire encoding alone (the second field of the line): Ollama's key id."""
        return self.public_line().split()[1]

    def public_pem(self) -> str:
        """SubjectPublicKeyInfo PEM, what `openssl pkeyutl -verify -pubin` reads."""
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def key_path(home: Path) -> Path:
    return home / KEY_FILE


def load_or_create_key(home: Path) -> UserKey:
    """The key under `home`, created (0600, with its .pub) if there is none yet."""
    path = key_path(home)
    if not path.exists():
        _create(path)
    return load_key(path, "move it away to have a new one created")


def load_key(path: Path, remedy: str = "point BERTH_SIGNING_KEY at an unencrypted ed25519 private key "
                                     "(ssh-keygen -t ed25519 -N '' makes one)") -> UserKey:
    """An unencrypted ed25519 private key in OpenSSH or PEM (PKCS#8) form."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorruptData(f"cannot read the key {path}: {exc.strerror or exc}; {remedy}") from None
    try:
        if raw.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            private = serialization.load_ssh_private_key(raw, password=None)
        else:
            private = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as exc:
        raise CorruptData(f"{path} is not an unencrypted ed25519 private key ({exc}); {remedy}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise CorruptData(f"{path} is not an ed25519 key; {remedy}")
    return UserKey(private, path)


def signing_key_setting(env: Mapping[str, str]) -> Path | None:
    """BERTH_SIGNING_KEY (a key every push is signed with), checked to be a usable key now, so a
    typo shows when the server starts rather than at a push."""
    raw = env.get(SIGNING_KEY_ENV, "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser()
    load_key(path)  # raises with the reason (missing, unreadable, not ed25519)
    return path


def _create(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    fd, temp = tempfile.mkstemp(prefix=".id_ed25519-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)  # before the secret is written
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return  # another process created it first; use theirs
        _write_public(path.with_name(path.name + ".pub"), public + f" {KEY_COMMENT}\n".encode())
    finally:
        Path(temp).unlink(missing_ok=True)


def _write_public(path: Path, line: bytes) -> None:
    fd, temp = tempfile.mkstemp(prefix=".id_ed25519.pub-", dir=path.parent)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o644)
        handle.write(line)
    os.replace(temp, path)


class KeyHolder:
    """Loads (or creates) the key on first use only, once per process object; thread-safe."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._lock = threading.Lock()
        self._key: UserKey | None = None

    def get(self) -> UserKey:
        with self._lock:
            if self._key is None:
                self._key = load_or_create_key(self.home)
            return self._key


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
