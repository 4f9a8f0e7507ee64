"""The catalog's tables (SQLAlchemy 2 ORM). Created and changed only by Alembic migrations."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class BlobRow(Base):
    """A file in the blob store, by digest. `model_info` caches GGUF metadata for /api/show."""

    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(71), primary_key=True)
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    model_info: Mapped[str | None] = mapped_column(Text, nullable=True)


class ManifestRow(Base):
    """A manifest's exact bytes; its digest is the sha256 of `raw`."""

    __tablename__ = "manifests"

    digest: Mapped[str] = mapped_column(String(71), primary_key=True)
    media_type: Mapped[str] = mapped_column(String(255), nullable=False)
    raw: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class LayerRow(Base):
    """manifest -> blob. The config blob is stored at position -1 so every reference is a row here."""

    __tablename__ = "layers"

    manifest_digest: Mapped[str] = mapped_column(
        String(71), ForeignKey("manifests.digest", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    blob_digest: Mapped[str] = mapped_column(String(71), ForeignKey("blobs.digest"), nullable=False)
    media_type: Mapped[str] = mapped_column(String(255), nullable=False)
    size: Mapped[int] = mapped_column(Integer, nullable=False)

    __table_args__ = (Index("ix_layers_blob_digest", "blob_digest"),)


class TagRow(Base):
    """A model name. `name_key` is the case-folded full name, so lookups ignore case."""

    __tablename__ = "tags"

    name_key: Mapped[str] = mapped_column(String(600), primary_key=True)
    host: Mapped[str] = mapped_column(String(350), nullable=False)
    namespace: Mapped[str] = mapped_column(String(80), nullable=False)
    model: Mapped[str] = mapped_column(String(80), nullable=False)
    tag: Mapped[str] = mapped_column(String(80), nullable=False)
    manifest_digest: Mapped[str] = mapped_column(String(71), ForeignKey("manifests.digest"), nullable=False)
    modified_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)

    __table_args__ = (Index("ix_tags_manifest_digest", "manifest_digest"),)
