"""Adopting files from this machine into the blob store: linked, copied across filesystems, verified."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from berth.registry.adopt import COPY, HARDLINK, UnreadableFile, adopt, stage
from berth.registry.blobstore import TEMP_PREFIX, BlobStore
from berth.registry.digest import Digest
from berth.registry.errors import DigestMismatch, TooLarge

DATA = b"weights " * 100_000


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "models")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(DATA)
    return path


def leftovers(store: BlobStore) -> list[str]:
    return [name for name in os.listdir(store.blobs_dir) if name.startswith(TEMP_PREFIX)]


def test_a_file_on_the_same_filesystem_is_hard_linked_and_verified(store: BlobStore, source: Path) -> None:
    expected = Digest.of_bytes(DATA)
    stored, method = adopt(store, source, expected)
    assert method == HARDLINK and stored.created and stored.digest == expected and stored.size == len(DATA)
    assert store.path(expected).stat().st_ino == source.stat().st_ino  # no second copy on disk
    assert source.read_bytes() == DATA and leftovers(store) == []
    again, _ = adopt(store, source)
    assert not again.created and source.stat().st_nlink == 2 and leftovers(store) == []


def test_a_symlink_is_followed_to_the_file(store: BlobStore, source: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.gguf"
    link.symlink_to(source)
    stored, _ = adopt(store, link)
    assert store.path(stored.digest).stat().st_ino == source.stat().st_ino


def test_a_file_on_another_filesystem_is_copied(store: BlobStore) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(store.blobs_dir).st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    source = shm / f"berth-test-{os.getpid()}.gguf"
    source.write_bytes(DATA)
    try:
        stored, method = adopt(store, source, Digest.of_bytes(DATA))
    finally:
        source.unlink()
    assert method == COPY and store.path(stored.digest).read_bytes() == DATA
    assert oct(store.path(stored.digest).stat().st_mode & 0o777) == "0o644"


def test_a_wrong_digest_keeps_nothing(store: BlobStore, source: Path) -> None:
    wrong = Digest("0" * 64)
    with pytest.raises(DigestMismatch) as caught:
        adopt(store, source, wrong)
    assert caught.value.message == f'digest mismatch, expected "{wrong}", got "{Digest.of_bytes(DATA)}"'
    assert list(store.stored_digests()) == [] and leftovers(store) == []
    assert source.read_bytes() == DATA and source.stat().st_nlink == 1


@pytest.mark.parametrize("make", ["fifo", "directory", "device", "missing"])
def test_only_regular_files_are_adopted(store: BlobStore, tmp_path: Path, make: str) -> None:
    path = {"device": Path("/dev/zero"), "missing": tmp_path / "nope"}.get(make, tmp_path / make)
    if make == "fifo":
        os.mkfifo(path)  # opening it must not wait for a writer
    elif make == "directory":
        path.mkdir()
    started = time.monotonic()
    with pytest.raises(UnreadableFile) as caught:
        adopt(store, path)
    assert time.monotonic() - started < 2
    assert str(path) in caught.value.message and leftovers(store) == []


def test_the_size_bound_is_checked_before_anything_is_placed(store: BlobStore, source: Path) -> None:
    with pytest.raises(TooLarge):
        adopt(store, source, max_size=len(DATA) - 1)
    assert leftovers(store) == []


def test_a_staged_file_is_locked_against_the_sweep_and_discarded_on_exit(store: BlobStore, source: Path) -> None:
    with stage(store, source) as staged:
        assert staged.temp_path.exists()
        assert store.sweep_temp_files() == []  # a live stage holds the lock
        assert staged.digest() == Digest(hashlib.sha256(DATA).hexdigest())
    assert not staged.temp_path.exists() and list(store.stored_digests()) == []
