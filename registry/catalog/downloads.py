"""Partial downloads in the catalog: which chunks of a blob being pulled are durably on disk.

A pull writes a blob into `blobs/sha256-<hex>-partial` in fixed-size chunks. Each chunk's row
records how many of its bytes are durable (`completed`, only ever a figure an fdatasync covered)
and, once the blob's running sha256 has passed the chunk's end, its check: "prefix-sha256:<hex>",
the digest of the blob's bytes from the start up to that end ("crc32:<8hex>" or "sha256:<hex>" of
the chunk alone in rows of earlier versions). After a crash the next pull re-reads the durable
chunks once, rebuilding the blob's sha256 and comparing each check as it passes, refetches a chunk
that fails, and fetches the rest from the first byte not on disk. A check only catches bytes changed
on disk between runs; the blob's sha256 is what proves them, so nothing unproven is ever committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from datetime import datetime, timezone

from sqlalchemy import DateTime, ForeignKey, Integer, String, delete, select
from sqlalchemy.orm import Mapped, mapped_column

from berth.registry.catalog.schema import Base
from berth.registry.digest import Digest

if TYPE_CHECKING:  # the library opens the catalog this module is part of
    from berth.registry.library import Library


class PartialDownloadRow(Base):
    """A blob being downloaded: its expected size and how it is cut into chunks."""

    __tablename__ = "partial_downloads"

    digest: Mapped[str] = mapped_column(String(71), primary_key=True)
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    chunk_size: Mapped[int] = mapped_column(Integer, nullable=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class PartialChunkRow(Base):
    """One chunk of a partial download: durable bytes, and its check once the hashed front passed it."""

    __tablename__ = "partial_chunks"

    digest: Mapped[str] = mapped_column(
        String(71), ForeignKey("partial_downloads.digest", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    completed: Mapped[int] = mapped_column(Integer, nullable=False)
    checksum: Mapped[str | None] = mapped_column(String(80), nullable=True)


@dataclass
class ChunkState:
    completed: int
    checksum: str | None


@dataclass
class PartialState:
    size: int
    chunk_size: int
    chunks: dict[int, ChunkState]


_RECORD_CHUNKS = (
    f"INSERT INTO {PartialChunkRow.__tablename__} (digest, idx, completed, checksum) VALUES (?, ?, ?, ?) "
    f"ON CONFLICT (digest, idx) DO UPDATE SET completed = excluded.completed, "
    f"checksum = coalesce(excluded.checksum, {PartialChunkRow.__tablename__}.checksum)")


class DownloadJournal:
    """Reads and writes partial-download rows; each call is its own short transaction."""

    def __init__(self, library: Library) -> None:
        self._library = library

    def load(self, digest: Digest) -> PartialState | None:
        with self._library.session() as session:
            row = session.get(PartialDownloadRow, str(digest))
            if row is None:
                return None
            chunks = session.execute(
                select(PartialChunkRow.idx, PartialChunkRow.completed, PartialChunkRow.checksum)
                .where(PartialChunkRow.digest == str(digest))).all()
            return PartialState(row.size, row.chunk_size, {i: ChunkState(c, h) for i, c, h in chunks})

    def start(self, digest: Digest, size: int, chunk_size: int) -> None:
        """Begin afresh: any earlier record of this digest is dropped."""
        with self._library.session() as session:
            session.execute(delete(PartialChunkRow).where(PartialChunkRow.digest == str(digest)))
            session.execute(delete(PartialDownloadRow).where(PartialDownloadRow.digest == str(digest)))
            session.add(PartialDownloadRow(digest=str(digest), size=size, chunk_size=chunk_size,
                                           started_at=datetime.now(timezone.utc)))

    def record(self, digest: Digest, chunks: dict[int, tuple[int, str | None]]) -> None:
        """Save `{idx: (completed, checksum or None)}` in one transaction; a None keeps the old checksum."""
        if not chunks:
            return
        # A pull records at every checkpoint (16 MiB), during the transfer. Through the ORM a record
        # cost ~0.5 ms of CPU, ~2 ms on two cores busy with the transfer: a tenth of a pull's CPU.
        # One plain statement, which SQLite keeps compiled, costs a tenth of that.
        with self._library.engine.begin() as connection:
            connection.exec_driver_sql(_RECORD_CHUNKS, [(str(digest), idx, completed, checksum)
                                                        for idx, (completed, checksum) in chunks.items()])

    def reset(self, digest: Digest, idx: int) -> None:
        """Forget what was recorded of chunk `idx` (its bytes on disk failed their checksum)."""
        with self._library.session() as session:
            session.execute(delete(PartialChunkRow).where(PartialChunkRow.digest == str(digest),
                                                          PartialChunkRow.idx == idx))

    def forget(self, digest: Digest) -> None:
        with self._library.session() as session:
            session.execute(delete(PartialChunkRow).where(PartialChunkRow.digest == str(digest)))
            session.execute(delete(PartialDownloadRow).where(PartialDownloadRow.digest == str(digest)))
