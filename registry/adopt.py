"""Bringing a file that is already on this machine into the blob store without copying its bytes.

Used by create (a client on the server's own machine names a GGUF on its disk) and by
`berth import-ollama`. The file is put into the blobs directory under a locked temporary name,
hashed there, and renamed to its blob name only once its digest is known (and matches the
expected one), the same protocol as `registry.blobstore.BlobWriter`, so the blob name only ever
holds verified bytes and a killed process leaves only a temporary file that the sweep removes.

How the file gets there, best first:
* a reflink (FICLONE: btrfs, XFS, bcachefs): no extra space, and later edits of the original file
  do not reach the blob (copy-on-write);
* a hard link: no extra space, but blob and original are one inode, so an in-place edit of the
  original would change the blob (`berth fsck` would then report it corrupt). Tools that write
  models (llama.cpp, huggingface-cli, Ollama) write a new file and rename it, which is safe;
* a copy in the kernel (copy_file_range), when the file is on another filesystem or may not be
  linked (fs.protected_hardlinks and a file the server does not own).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from berth.registry.blobstore import TEMP_PREFIX, BlobStore, StoredBlob
from berth.registry.digest import Digest
from berth.registry.errors import DigestMismatch, InvalidInput, TooLarge

# linux/fs.h: _IOW(0x94, 9, int)
FICLONE = 0x40049409
HASH_CHUNK = 1024 * 1024  # measured: as fast as larger reads, and the buffer stays in cache

REFLINK = "reflink"
HARDLINK = "hardlink"
COPY = "copy"


class UnreadableFile(InvalidInput):
    """A file named for adoption cannot be opened or is not a regular file."""


@dataclass
class StagedFile:
    """A file placed in the blobs directory under a temporary name; `publish` makes it a blob."""

    store: BlobStore
    temp_path: Path
    method: str  # REFLINK, HARDLINK or COPY
    _handle: BinaryIO | None
    _digest: Digest | None = None
    size: int = 0

    def digest(self) -> Digest:
        """Hash the staged bytes (once; later calls return the same digest)."""
        if self._digest is None:
            handle = self._open_handle()
            hasher = hashlib.sha256()
            buffer = bytearray(HASH_CHUNK)
            view = memoryview(buffer)
            handle.seek(0)
            size = 0
            while count := handle.readinto(buffer):
                hasher.update(view[:count])
                size += count
            self.size = size
            self._digest = Digest(hasher.hexdigest())
        return self._digest

    def publish(self, expected: Digest | None = None) -> StoredBlob:
        """Rename the staged file to its blob name; DigestMismatch (nothing kept) if it is not `expected`."""
        digest = self.digest()
        if expected is not None and digest != expected:
            self.discard()
            raise DigestMismatch(str(expected), str(digest))
        handle = self._open_handle()
        # A hard link shares the original's data, which its writer may not have flushed yet.
        os.fsync(handle.fileno())
        final = self.store.path(digest)
        created = not final.exists()
        if created:
            os.replace(self.temp_path, final)
            self.store.sync_dir()
        else:
            self.temp_path.unlink(missing_ok=True)
        self._close()
        return StoredBlob(digest, self.size, created)

    def discard(self) -> None:
        if self._handle is not None:
            self.temp_path.unlink(missing_ok=True)
            self._close()

    def _open_handle(self) -> BinaryIO:
        if self._handle is None:
            raise ValueError("the staged file was already published or discarded")
        return self._handle

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()  # also releases the lock
            self._handle = None

    def __enter__(self) -> "StagedFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def stage(store: BlobStore, source: Path, max_size: int | None = None) -> StagedFile:
    """Place `source` in the blobs directory under a locked temporary name (reflink, link or copy).

    Raises UnreadableFile when it cannot be opened or is not a regular file (a FIFO or a device
    would never end: CVE-2024-39721); TooLarge when it is over `max_size`.
    """
    source_fd = open_regular_file(source)
    try:
        return stage_descriptor(store, source_fd, f'"{source}"', max_size)
    finally:
        os.close(source_fd)


def stage_descriptor(store: BlobStore, source_fd: int, label: str, max_size: int | None = None,
                     methods: tuple[str, ...] = (REFLINK, HARDLINK, COPY)) -> StagedFile:
    """Place the open regular file `source_fd` in the blobs directory under a locked temporary name,
    by the first of `methods` that works here (COPY always does, if it is among them). `label`
    names the file in errors. The caller keeps and closes `source_fd`."""
    info = os.fstat(source_fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableFile(f"{label} is not a regular file")
    if max_size is not None and info.st_size > max_size:
        raise TooLarge(f"{label} is {info.st_size} bytes, more than the {max_size}-byte limit")
    temp_path = store.blobs_dir / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    for method in methods:
        handle = _place(method, source_fd, temp_path)
        if handle is not None:
            return StagedFile(store, temp_path, method, handle)
    raise UnreadableFile(f"{label} could not be placed in the blob store by {', '.join(methods)}")


def open_regular_file(path: Path) -> int:
    """A read-only descriptor of `path`, which must be a regular file; UnreadableFile otherwise."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UnreadableFile(f'cannot read "{path}": {exc.strerror}') from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnreadableFile(f'"{path}" is not a regular file')
    return fd


def adopt(store: BlobStore, source: Path, expected: Digest | None = None,
          max_size: int | None = None) -> tuple[StoredBlob, str]:
    """Stage, hash and publish `source`; returns the stored blob and how it was placed."""
    with stage(store, source, max_size) as staged:
        return staged.publish(expected), staged.method


def _place(method: str, source_fd: int, temp_path: Path) -> BinaryIO | None:
    """Put the source at `temp_path` by `method`; a locked read handle, or None if it does not apply."""
    try:
        if method == HARDLINK:
            _link_open_file(source_fd, temp_path)
        else:
            _clone_or_copy(method, source_fd, temp_path)
    except OSError as exc:
        temp_path.unlink(missing_ok=True)
        if method == COPY:
            raise InvalidInput(f"cannot copy the file into the blob store: {exc.strerror}") from None
        return None  # not supported here (other filesystem, no reflinks, protected_hardlinks)
    handle = open(temp_path, "rb", buffering=0)
    try:
        # The lock marks the temporary file as live, as BlobWriter's does (see sweep_temp_files).
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # Only a hard link can be locked already: by someone holding a lock on the original.
        handle.close()
        temp_path.unlink(missing_ok=True)
        return None
    return handle


def _link_open_file(source_fd: int, temp_path: Path) -> None:
    """Hard-link the inode that was opened and checked, not whatever its path names by now.

    linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N does that; Python calls linkat (rather than
    link, which would not follow the /proc link) only when given a directory fd.
    """
    directory_fd = os.open(temp_path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{source_fd}", temp_path.name, dst_dir_fd=directory_fd, follow_symlinks=True)
    finally:
        os.close(directory_fd)


def _clone_or_copy(method: str, source_fd: int, temp_path: Path) -> None:
    target_fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        if method == REFLINK:
            fcntl.ioctl(target_fd, FICLONE, source_fd)
        else:
            _copy_range(source_fd, target_fd)
    finally:
        os.close(target_fd)


def _copy_range(source_fd: int, target_fd: int) -> None:
    size = os.fstat(source_fd).st_size
    offset = 0
    in_kernel_copy = True  # copy_file_range; sendfile where it is not supported
    while offset < size:
        if in_kernel_copy:
            try:
                copied = os.copy_file_range(source_fd, target_fd, size - offset, offset, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                in_kernel_copy = False
                os.lseek(target_fd, offset, os.SEEK_SET)  # sendfile writes at the file position
                continue
        else:
            copied = os.sendfile(target_fd, source_fd, offset, size - offset)
        if copied == 0:
            break  # the file shrank while we copied; the hash covers what is there
        offset += copied
