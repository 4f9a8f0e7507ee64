"""The blob store: hashed while written, published only on a digest match, safe under a killed writer."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from berth.registry.blobstore import TEMP_PREFIX, BlobStore
from berth.registry.digest import Digest
from berth.registry.errors import BlobNotFound, DigestMismatch, TooLarge


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path)


def _temp_files(store: BlobStore) -> list[str]:
    return [p.name for p in store.blobs_dir.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_write_publishes_under_digest(store: BlobStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    stored = store.write_stream([data[:1000], data[1000:]])
    assert stored.digest.hex == hashlib.sha256(data).hexdigest()
    assert stored.size == len(data) and stored.created
    assert store.path(stored.digest).read_bytes() == data
    assert store.path(stored.digest).name == "sha256-" + stored.digest.hex
    assert oct(store.path(stored.digest).stat().st_mode & 0o777) == "0o644"
    assert _temp_files(store) == []


def test_second_write_of_same_bytes_is_deduplicated(store: BlobStore) -> None:
    first = store.write_bytes(b"same")
    second = store.write_bytes(b"same")
    assert first.digest == second.digest and not second.created
    assert len(list(store.stored_digests())) == 1


def test_expected_digest_mismatch_keeps_nothing(store: BlobStore) -> None:
    wrong = Digest("0" * 64)
    with pytest.raises(DigestMismatch) as info:
        store.write_stream([b"payload"], expected=wrong)
    assert str(wrong) in str(info.value)
    assert list(store.blobs_dir.iterdir()) == []


def test_size_bound_aborts_and_cleans_up(store: BlobStore) -> None:
    with pytest.raises(TooLarge):
        store.write_stream([b"x" * 10, b"y" * 10], max_size=15)
    assert list(store.blobs_dir.iterdir()) == []


def test_error_in_the_middle_leaves_no_blob(store: BlobStore) -> None:
    def chunks():
        yield b"a" * 100
        raise OSError("source went away")

    with pytest.raises(OSError):
        store.write_stream(chunks())
    assert list(store.blobs_dir.iterdir()) == []


def test_missing_blob_errors(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        store.size(Digest("1" * 64))
    with pytest.raises(BlobNotFound):
        store.read_bytes(Digest("1" * 64), 10)


def test_read_bytes_is_bounded(store: BlobStore) -> None:
    stored = store.write_bytes(b"z" * 100)
    with pytest.raises(TooLarge):
        store.read_bytes(stored.digest, 99)
    assert store.read_bytes(stored.digest, 100) == b"z" * 100


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from berth.registry.blobstore import BlobStore
    store = BlobStore(Path(sys.argv[1]))
    writer = store.writer()
    writer.write(b"x" * (8 * 1024 * 1024))
    print("writing", flush=True)
    time.sleep(60)
    writer.write(b"y")
    writer.commit()
    """
)


def test_killed_writer_leaves_no_blob_and_its_temp_file_is_swept(store: BlobStore, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"writing"
    # While the writer lives, its temp file is locked and the sweep leaves it alone.
    assert len(_temp_files(store)) == 1
    assert store.sweep_temp_files() == []
    assert len(_temp_files(store)) == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert list(store.stored_digests()) == []  # nothing was published under a blob name
    removed = store.sweep_temp_files()
    assert len(removed) == 1
    assert list(store.blobs_dir.iterdir()) == []


def test_hash_file_detects_corruption(store: BlobStore) -> None:
    stored = store.write_bytes(b"original bytes")
    assert store.hash_file(stored.digest) == stored.digest
    store.path(stored.digest).write_bytes(b"tampered bytes")
    assert store.hash_file(stored.digest) != stored.digest
