"""registry/body.py: a blob body into a file, by splice, directly from the socket, or through httpx.

The ways are checked against the real docker-registry, and against a one-shot socket server for
bodies that stop or hang. A file system that refuses splice, and a full disk, cannot be had here on
demand: a stand-in for the pipe-to-file step raises what such a kernel or disk would.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from berth.registry.body import SpliceToFile, splice_pipe_to_file, write_body
from tests.registry_fixture import LocalRegistry

MiB = 1024 * 1024
WAYS = {"splice": splice_pipe_to_file, "direct": None}


def _upload(registry: LocalRegistry, data: bytes) -> str:
    """A blob pushed to the real registry (monolithic upload); its URL."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=registry.url) as client:
        started = client.post("/v2/body/test/blobs/uploads/")
        assert started.status_code == 202, started.text
        # The Location carries the upload's state in its query: the digest is added to it.
        location = httpx.URL(started.headers["location"]).copy_add_param("digest", digest)
        done = client.put(location, content=data,
                          headers={"Content-Type": "application/octet-stream"})
        assert done.status_code == 201, done.text
    return f"{registry.url}/v2/body/test/blobs/{digest}"


def _write(url: str, path: Path, offset: int, limit: int, splice_to_file: SpliceToFile | None,
           headers: dict[str, str] | None = None, read_timeout: float = 10) -> list[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        with httpx.Client() as client, client.stream("GET", url, headers=headers) as response:
            assert response.status_code in (200, 206)
            return list(write_body(response, fd, offset, limit, read_timeout, bytearray(256 * 1024),
                                   splice_to_file))
    finally:
        os.close(fd)


@pytest.mark.parametrize("way", WAYS)
def test_a_ranged_body_lands_at_its_offset_and_nothing_else_changes(way: str, registry: LocalRegistry,
                                                                    tmp_path: Path) -> None:
    data = os.urandom(5 * MiB + 123)
    url = _upload(registry, data)
    path = tmp_path / "partial"
    path.write_bytes(b"\xee" * len(data))
    moved: list[int] = []

    def counting(pipe: int, fd: int, count: int, offset: int) -> int:
        moved.append(count)
        return splice_pipe_to_file(pipe, fd, count, offset)

    start, end = MiB + 7, 4 * MiB + 11
    pieces = _write(url, path, start, end - start, counting if WAYS[way] else None,
                    headers={"Range": f"bytes={start}-{end - 1}"})
    assert sum(pieces) == end - start
    written = path.read_bytes()
    assert written[start:end] == data[start:end]
    assert written[:start] == b"\xee" * start and written[end:] == b"\xee" * (len(data) - end)
    # The splice way moved the body in the kernel (all but what h11 had buffered with the headers).
    assert (sum(moved) > end - start - 256 * 1024) if way == "splice" else not moved


@pytest.mark.parametrize("way", WAYS)
def test_no_more_than_the_limit_is_written(way: str, registry: LocalRegistry, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    url = _upload(registry, data)  # served whole (200), as by a registry that ignores Range
    path = tmp_path / "partial"
    path.write_bytes(bytes(len(data)))
    assert sum(_write(url, path, 0, 2 * MiB + 1, WAYS[way])) == 2 * MiB + 1
    written = path.read_bytes()
    assert written[:2 * MiB + 1] == data[:2 * MiB + 1] and written[2 * MiB + 1:] == bytes(MiB - 1)


def test_a_file_system_that_refuses_splice_gets_the_bytes_the_ordinary_way(registry: LocalRegistry,
                                                                           tmp_path: Path) -> None:
    data = os.urandom(4 * MiB + 9)
    url = _upload(registry, data)
    path = tmp_path / "partial"
    tries: list[int] = []

    def refusing(pipe: int, fd: int, count: int, offset: int) -> int:
        tries.append(count)
        raise OSError(errno.EINVAL, "Invalid argument")  # what a file without splice_write answers

    assert sum(_write(url, path, 0, len(data), refusing)) == len(data)
    assert path.read_bytes() == data
    assert len(tries) == 1  # refused once, then the rest went the direct way


def test_a_disk_error_while_splicing_is_an_os_error_not_a_network_one(registry: LocalRegistry,
                                                                      tmp_path: Path) -> None:
    url = _upload(registry, os.urandom(2 * MiB))

    def full(pipe: int, fd: int, count: int, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as raised:
        _write(url, tmp_path / "partial", 0, 2 * MiB, full)
    assert raised.value.errno == errno.ENOSPC and not isinstance(raised.value, httpx.TransportError)


class OneShotServer:
    """Answers one GET with a Content-Length of `length`, sends `sent` bytes, then hangs or closes."""

    def __init__(self, length: int, sent: int, hang: bool) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/blob"
        self.release = threading.Event()
        threading.Thread(target=self._serve, args=(length, sent, hang), daemon=True).start()

    def _serve(self, length: int, sent: int, hang: bool) -> None:
        conn, _ = self.listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n".encode())
            # Apart from the headers, so the body comes from the socket and not from h11's buffer.
            threading.Event().wait(0.05)
            conn.sendall(b"x" * sent)
            if hang:
                self.release.wait(30)

    def close(self) -> None:
        self.release.set()
        self.listener.close()


@pytest.fixture
def one_shot(request: pytest.FixtureRequest) -> Iterator[OneShotServer]:
    length, sent, hang = request.param
    server = OneShotServer(length, sent, hang)
    yield server
    server.close()


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("one_shot", [(2 * MiB, MiB, True)], indirect=True)
def test_a_body_that_stops_coming_times_out_with_what_landed_kept(way: str, one_shot: OneShotServer,
                                                                  tmp_path: Path) -> None:
    path = tmp_path / "partial"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    landed = 0
    try:
        with httpx.Client() as client, client.stream("GET", one_shot.url) as response:
            with pytest.raises(httpx.ReadTimeout):
                for count in write_body(response, fd, 0, 2 * MiB, 0.5, bytearray(64 * 1024), WAYS[way]):
                    landed += count
    finally:
        os.close(fd)
    assert landed == MiB and path.read_bytes()[:MiB] == b"x" * MiB


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("one_shot", [(2 * MiB, MiB + 5, False)], indirect=True)
def test_a_body_cut_short_says_how_much_was_missing(way: str, one_shot: OneShotServer, tmp_path: Path) -> None:
    path = tmp_path / "partial"
    with pytest.raises(httpx.RemoteProtocolError, match=f"closed {MiB - 5} bytes before the end"):
        _write(one_shot.url, path, 0, 2 * MiB, WAYS[way])
    assert path.read_bytes() == b"x" * (MiB + 5)
