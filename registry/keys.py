"""API keys: random secrets shown once, stored only as SHA-256 hashes, each with scopes.

Scopes nest: `admin` includes `write`, which includes `read`.
- read: generate, chat, embed, show, list, ps, and pulling models from this host;
- write: pull into this host, push, create, copy, delete;
- admin: managing keys.
A key looks like `berth_<40 url-safe characters>`; its first 12 characters are kept to name it in
listings. The secrets are 240 random bits, so a fast hash is enough (no password stretching).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import DateTime, String, select
from sqlalchemy.orm import Mapped, mapped_column

from berth.registry.catalog.schema import Base
from berth.registry.errors import Conflict, InvalidInput, NotFound
from berth.registry.library import Library, utcnow

SCOPES = ("read", "write", "admin")
KEY_PREFIX = "berth_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,79}")


class KeyExists(Conflict):
    pass


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    name: Mapped[str] = mapped_column(String(80), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    secret_sha256: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    scopes: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


@dataclass(frozen=True)
class ApiKey:
    name: str
    prefix: str
    scope: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    def allows(self, needed: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(needed)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "prefix": self.prefix, "scope": self.scope,
                "created_at": self.created_at.isoformat(),
                "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
                "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None}


def _record(row: ApiKeyRow) -> ApiKey:
    return ApiKey(row.name, row.prefix, row.scopes, row.created_at, row.revoked_at, row.last_used_at)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_scope(value: str) -> str:
    """`read`, `write` or `admin` (a comma list collapses to its widest scope)."""
    parts = [p.strip().lower() for p in value.split(",") if p.strip()]
    unknown = [p for p in parts if p not in SCOPES]
    if not parts or unknown:
        raise InvalidInput(f"invalid scope {value!r}; use read, write or admin")
    return max(parts, key=SCOPES.index)


class KeyStore:
    def __init__(self, library: Library) -> None:
        self.library = library

    def create(self, name: str, scope: str) -> tuple[str, ApiKey]:
        """Make a key; the secret is returned once and never stored."""
        if not _NAME.fullmatch(name):
            raise InvalidInput(f"invalid key name {name!r}: use 1-80 letters, digits, '_', '.', '@' or '-'")
        scope = parse_scope(scope)
        secret = KEY_PREFIX + secrets.token_urlsafe(30)
        with self.library.session() as session:
            existing = session.get(ApiKeyRow, name)
            if existing is not None and existing.revoked_at is None:
                raise KeyExists(f"a key named {name!r} exists; revoke it first or pick another name")
            if existing is not None:
                session.delete(existing)  # a revoked key's name is free again
                session.flush()
            row = ApiKeyRow(name=name, prefix=secret[:12], secret_sha256=_hash(secret), scopes=scope,
                            created_at=utcnow())
            session.add(row)
            session.flush()
            return secret, _record(row)

    def list(self) -> list[ApiKey]:
        with self.library.session() as session:
            return [_record(r) for r in session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))]

    def revoke(self, name: str) -> ApiKey:
        with self.library.session() as session:
            row = session.get(ApiKeyRow, name)
            if row is None:
                raise NotFound(f"no key named {name!r}; `berth keys list` shows the keys")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return _record(row)

    def verify(self, secret: str) -> ApiKey | None:
        """The live key for this secret, or None (unknown or revoked)."""
        if not secret.startswith(KEY_PREFIX):
            return None
        digest = _hash(secret)
        with self.library.session() as session:
            row = session.scalars(select(ApiKeyRow).where(ApiKeyRow.secret_sha256 == digest)).first()
            if row is None or not hmac.compare_digest(row.secret_sha256, digest) or row.revoked_at is not None:
                return None
            row.last_used_at = utcnow()
            return _record(row)

    def any_keys(self) -> bool:
        with self.library.session() as session:
            return session.scalars(select(ApiKeyRow.name).where(ApiKeyRow.revoked_at.is_(None))).first() is not None
