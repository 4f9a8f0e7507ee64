"""The content-addressed blob store: `$BERTH_MODELS/blobs/sha256-<hex>`.

A blob is written to a temporary file in the same directory, hashed as it is written, fsynced,
and renamed to its final name only when its digest is known (and matches the expected one). So a
file under a blob name is always complete; a killed writer leaves only a temporary file, which
holds an exclusive lock while its writer lives and is swept once nobody holds it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from berth.registry.digest import Digest
from berth.registry.errors import BlobNotFound, DigestMismatch, TooLarge

TEMP_PREFIX = ".incoming-"
# Large enough that Python overhead per chunk is noise next to hashing and I/O.
CHUNK_SIZE = 4 * 1024 * 1024
# Chunks at least this big are hashed on a helper thread while the previous one is written:
# hashlib and file writes both release the GIL, so the two overlap on separate cores.
PIPELINE_THRESHOLD = 1024 * 1024


@dataclass(frozen=True)
class StoredBlob:
    digest: Digest
    size: int
    created: bool  # False when an identical blob was already stored


class BlobWriter:
    """Streams bytes into a locked temporary file while hashing them; `commit` publishes them."""

    def __init__(self, store: "BlobStore", expected: Digest | None, max_size: int | None) -> None:
        self._store = store
        self._expected = expected
        self._max_size = max_size
        self._hash = hashlib.sha256()
        self.size = 0
        self._hasher: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self.temp_path = store.blobs_dir / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        self._file: BinaryIO | None = open(self.temp_path, "xb")
        # The lock marks the temp file as live; `sweep_temp_files` only removes unlocked ones.
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._file is None:
            raise ValueError("blob writer is closed")
        if self._max_size is not None and self.size + len(data) > self._max_size:
            raise TooLarge(f"blob is larger than the {self._max_size}-byte limit")
        self._wait_for_hash()
        if len(data) >= PIPELINE_THRESHOLD:
            if not isinstance(data, bytes):
                data = bytes(data)  # the caller may reuse its buffer while we hash
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-hash")
            self._pending = self._hasher.submit(self._hash.update, data)
        else:
            self._hash.update(data)
        self._file.write(data)
        self.size += len(data)

    def _wait_for_hash(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def commit(self) -> StoredBlob:
        """fsync, check the digest, and rename into place. Raises DigestMismatch (nothing kept)."""
        if self._file is None:
            raise ValueError("blob writer is closed")
        self._wait_for_hash()
        digest = Digest(self._hash.hexdigest())
        if self._expected is not None and digest != self._expected:
            self.abort()
            raise DigestMismatch(str(self._expected), str(digest))
        self._file.flush()
        os.fsync(self._file.fileno())
        final = self._store.path(digest)
        created = not final.exists()
        if created:
            os.chmod(self.temp_path, 0o644)
            os.replace(self.temp_path, final)
            self._store.sync_dir()
        else:
            self.temp_path.unlink(missing_ok=True)
        self._close()
        return StoredBlob(digest, self.size, created)

    def abort(self) -> None:
        if self._file is not None:
            self.temp_path.unlink(missing_ok=True)
            self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class BlobStore:
    """Files of the blob store. Knows nothing of the catalog; `registry.library` keeps them in step."""

    def __init__(self, root: Path) -> None:
        self.blobs_dir = root / "blobs"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: Digest) -> Path:
        # `digest` is a validated Digest, so the join cannot leave the blobs directory.
        return self.blobs_dir / digest.filename

    def exists(self, digest: Digest) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: Digest) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(str(digest)) from None

    def writer(self, expected: Digest | None = None, max_size: int | None = None) -> BlobWriter:
        return BlobWriter(self, expected, max_size)

    def write_stream(
        self, chunks: Iterable[bytes], expected: Digest | None = None, max_size: int | None = None
    ) -> StoredBlob:
        with self.writer(expected, max_size) as writer:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()

    def write_bytes(self, data: bytes) -> StoredBlob:
        return self.write_stream([data])

    def read_bytes(self, digest: Digest, limit: int) -> bytes:
        """Read a small blob whole, refusing one larger than `limit`."""
        path = self.path(digest)
        try:
            with open(path, "rb") as handle:
                data = handle.read(limit + 1)
        except FileNotFoundError:
            raise BlobNotFound(str(digest)) from None
        if len(data) > limit:
            raise TooLarge(f"blob {digest} is larger than the {limit}-byte limit for this kind of layer")
        return data

    def hash_file(self, digest: Digest) -> Digest:
        """Re-hash a stored blob (fsck): the name is never trusted alone."""
        hasher = hashlib.sha256()
        with open(self.path(digest), "rb") as handle:
            while chunk := handle.read(CHUNK_SIZE):
                hasher.update(chunk)
        return Digest(hasher.hexdigest())

    def remove(self, digest: Digest) -> None:
        self.path(digest).unlink(missing_ok=True)

    def stored_digests(self) -> Iterator[Digest]:
        """Digests of every file named like a blob."""
        for entry in os.scandir(self.blobs_dir):
            digest = Digest.from_filename(entry.name)
            if digest is not None and entry.is_file():
                yield digest

    def sweep_temp_files(self) -> list[Path]:
        """Remove temporary files whose writer is gone (no lock held); return what was removed."""
        removed: list[Path] = []
        for entry in os.scandir(self.blobs_dir):
            if not entry.name.startswith(TEMP_PREFIX):
                continue
            path = Path(entry.path)
            try:
                with open(path, "rb") as handle:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    path.unlink(missing_ok=True)
                    removed.append(path)
            except BlockingIOError:
                continue  # a live writer holds it
            except FileNotFoundError:
                continue
        return removed

    def sync_dir(self) -> None:
        fd = os.open(self.blobs_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
