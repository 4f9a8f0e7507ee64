"""Handing open files to the server over its Unix socket: real sockets, real descriptors, a real store."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from berth.registry import file_handoff
from berth.registry.blobstore import BlobStore
from berth.registry.digest import Digest
from berth.registry.file_handoff import HandoffError, HandoffServer, hand_over

pytestmark = pytest.mark.skipif(not file_handoff.supported(), reason="needs Linux's SCM_RIGHTS and SO_PEERCRED")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[HandoffServer]:
    server = HandoffServer(BlobStore(tmp_path / "store"), max_size=1 << 20)
    yield server
    server.close()


def test_handed_files_are_linked_into_the_store(listener: HandoffServer, tmp_path: Path) -> None:
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    first.write_bytes(os.urandom(4096))
    second.write_bytes(b"second")
    received = hand_over(listener.name, [str(first), str(second)])
    assert [item.digest for item in received] == [str(Digest.of_bytes(p.read_bytes())) for p in (first, second)]
    assert [item.size for item in received] == [4096, 6]
    blob = listener.store.path(Digest.parse(received[0].digest))
    assert blob.read_bytes() == first.read_bytes()
    if received[0].method == "hardlink":
        assert blob.stat().st_ino == first.stat().st_ino  # the very inode the client opened, not a copy


def test_what_the_server_refuses(listener: HandoffServer, tmp_path: Path) -> None:
    big = tmp_path / "big.gguf"
    big.write_bytes(b"\0" * ((1 << 20) + 1))
    with pytest.raises(HandoffError, match="more than the"):
        hand_over(listener.name, [str(big)])
    read_end, write_end = os.pipe()  # not a regular file: it would never end
    try:
        with pytest.raises(HandoffError, match="not a regular file"):
            _send(listener.name, ["pipe"], [read_end])
    finally:
        os.close(read_end)
        os.close(write_end)
    small = tmp_path / "s"
    small.write_bytes(b"x")
    fd = os.open(small, os.O_RDONLY)
    try:
        with pytest.raises(HandoffError, match="one file per descriptor"):
            _send(listener.name, ["a", "b"], [fd])
        with pytest.raises(HandoffError, match=f"at most {file_handoff.MAX_FILES} files"):
            _send(listener.name, ["f"] * 20, [fd] * 20)
    finally:
        os.close(fd)
    assert list(listener.store.stored_digests()) == []


def test_a_client_elsewhere_finds_no_socket(listener: HandoffServer, tmp_path: Path) -> None:
    """A tunnelled client looks for a name no server on its machine has (the name is random)."""
    (tmp_path / "m").write_bytes(b"m")
    with pytest.raises(OSError):
        hand_over("@berth-handoff-" + "0" * 24, [str(tmp_path / "m")])


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another user")
def test_another_user_is_told_to_upload(listener: HandoffServer) -> None:
    folder = Path(tempfile.mkdtemp())
    try:
        folder.chmod(0o755)
        (folder / "m.gguf").write_bytes(b"weights")
        (folder / "m.gguf").chmod(0o644)
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # the client, as nobody: it can open the file, but is not the server's user
            try:
                os.setgid(65534)
                os.setuid(65534)
                hand_over(listener.name, [str(folder / "m.gguf")])
                os.write(write_end, b"taken")
            except BaseException as exc:  # noqa: BLE001 - whatever it was, the parent reports it
                os.write(write_end, f"{type(exc).__name__}: {exc}".encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as answer:
            said = answer.read().decode()
        os.waitpid(child, 0)
        assert "only from its own user" in said
    finally:
        for item in folder.iterdir():
            item.unlink()
        folder.rmdir()
    assert list(listener.store.stored_digests()) == []


def _send(name: str, names: list[str], fds: list[int]) -> list[file_handoff.Received]:
    """A hand-made request: names and descriptors that need not match."""
    import json

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect("\0" + name[1:])
        socket.send_fds(conn, [json.dumps({"files": names}).encode()], fds)
        answer = json.loads(conn.recv(file_handoff.MAX_MESSAGE))
    if "error" in answer:
        raise HandoffError(answer["error"])
    return answer["files"]
