"""A blob response's body, written into a file at an offset with as few copies as the connection allows.

A pull's throughput on a fast link is bounded by CPU: the bytes are received, written, read back and
hashed, on the same cores as (for a local registry) the sender. So the body takes the cheapest way
its connection offers:

* **splice** (Linux, a plain HTTP/1.1 body with a Content-Length): socket to pipe to file inside the
  kernel; the bytes are never copied into Python. On loopback with two cores this made a whole pull
  about 9% faster than the direct way.
* **direct** (TLS, or where splice is unavailable or the file system refuses it): read from the
  socket straight into one reused buffer, then pwrite.
* **httpx** (chunked bodies, other protocols, TLS inside a proxy's TLS): httpx's own raw iterator.

httpx hands a body over in 64 KiB pieces, each through h11's buffer and a new bytes object; at loopback
and LAN speeds that bookkeeping, not the network, limited a pull. For a plain HTTP/1.1 body with a
Content-Length, the first piece h11 hands over is everything it buffered past the headers (its length
reader empties its buffer), so the rest can be taken from the socket directly. The connection is then
closed rather than reused, since h11 never saw the end of the body.

Read errors on the connection become httpx transport errors (a pull retries and resumes them); write
errors on the file stay OSError (a full or failing disk, which no retry mends).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import ssl
from typing import Any, Callable, Iterator

import httpcore
import httpx

PIPE_SIZE = 1024 * 1024  # bytes moved per splice; the unprivileged pipe-max-size default
# A file system whose files refuse splice says so with one of these (the bytes stay in the pipe).
_SPLICE_REFUSED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV}

# Moves up to `count` bytes from a pipe into `fd` at `offset`; os.splice by default (a parameter so a
# test can stand in for a file system without splice).
SpliceToFile = Callable[[int, int, int, int], int]


def splice_pipe_to_file(pipe: int, fd: int, count: int, offset: int) -> int:
    return os.splice(pipe, fd, count, offset_dst=offset, flags=os.SPLICE_F_MOVE)


def write_body(response: httpx.Response, fd: int, offset: int, limit: int, read_timeout: float | None,
               buffer: bytearray, splice_to_file: SpliceToFile | None = splice_pipe_to_file) -> Iterator[int]:
    """Write up to `limit` bytes of the streamed `response`'s raw body into `fd` from `offset` on,
    yielding the size of each piece once it is in the file (contiguous, in order). `buffer` is the
    direct way's receive buffer; `splice_to_file=None` turns the splice way off."""
    # Held to the end: dropping httpx's iterator would close the response, and the connection with it.
    pieces = response.iter_raw()
    stream = response.extensions.get("network_stream")
    length = response.headers.get("content-length", "")
    if (stream is None or response.http_version != "HTTP/1.1" or not length.isdigit()
            or "transfer-encoding" in response.headers):
        yield from _write_pieces(pieces, fd, offset, limit)
        return
    left = min(int(length), limit)
    first = next(pieces, b"")[:left]
    if first:
        _pwrite_all(fd, memoryview(first), offset)
        offset, left = offset + len(first), left - len(first)
        yield len(first)
    sock = _direct_socket(stream)
    if (left and splice_to_file is not None and hasattr(os, "splice") and isinstance(sock, socket.socket)
            and not isinstance(sock, ssl.SSLSocket)):
        for count in _splice(response, sock, fd, offset, left, read_timeout, splice_to_file):
            offset, left = offset + count, left - count
            yield count
    while left > 0:
        try:
            if sock is not None:
                sock.settimeout(read_timeout)
                data: bytes | memoryview = memoryview(buffer)[:sock.recv_into(buffer, min(len(buffer), left))]
            else:
                data = stream.read(min(len(buffer), left), read_timeout)
        except (socket.timeout, httpcore.TimeoutException) as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out", request=response.request) from None
        except (OSError, httpcore.NetworkError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=response.request) from None
        if not data:
            raise _ended_early(response, left)
        _pwrite_all(fd, memoryview(data), offset)
        offset, left = offset + len(data), left - len(data)
        yield len(data)


def _splice(response: httpx.Response, sock: socket.socket, fd: int, offset: int, left: int,
            read_timeout: float | None, splice_to_file: SpliceToFile) -> Iterator[int]:
    """Move the body socket -> pipe -> file until `left` is done, or stop early (having yielded what
    it wrote) when the file refuses splice, so the caller goes on the direct way."""
    read_end, write_end = os.pipe()
    try:
        try:
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe only means more, smaller moves
        sock.setblocking(False)  # waits go through poll, which keeps the read timeout
        ready = select.poll()
        ready.register(sock, select.POLLIN)
        wait_ms = None if read_timeout is None else int(read_timeout * 1000)
        while left > 0:
            try:
                count = os.splice(sock.fileno(), write_end, min(left, PIPE_SIZE),
                                  flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                if not ready.poll(wait_ms):
                    raise httpx.ReadTimeout(f"no data for {read_timeout} s", request=response.request) from None
                continue
            except OSError as exc:
                raise httpx.ReadError(str(exc), request=response.request) from None
            if not count:
                raise _ended_early(response, left)
            try:
                _drain(read_end, fd, count, offset, splice_to_file)
            except _Refused as refused:
                # Nothing of this piece is in the file: write it the ordinary way, then stop splicing.
                _pwrite_all(fd, memoryview(refused.data), offset)
                yield count
                return
            offset, left = offset + count, left - count
            yield count
    finally:
        os.close(read_end)
        os.close(write_end)


class _Refused(Exception):
    def __init__(self, data: bytes) -> None:
        self.data = data


def _drain(pipe: int, fd: int, count: int, offset: int, splice_to_file: SpliceToFile) -> None:
    """Move exactly `count` bytes from the pipe into the file at `offset`."""
    moved = 0
    while moved < count:
        try:
            moved += splice_to_file(pipe, fd, count - moved, offset + moved)
        except OSError as exc:
            if moved or exc.errno not in _SPLICE_REFUSED:
                raise  # a disk error (ENOSPC, EIO): no retry mends it
            raise _Refused(_read_exactly(pipe, count)) from None


def _read_exactly(pipe: int, count: int) -> bytes:
    pieces: list[bytes] = []
    while count:
        piece = os.read(pipe, count)
        pieces.append(piece)
        count -= len(piece)
    return b"".join(pieces)


def _write_pieces(pieces: Iterator[bytes], fd: int, offset: int, limit: int) -> Iterator[int]:
    for piece in pieces:
        piece = piece[:limit]
        _pwrite_all(fd, memoryview(piece), offset)
        offset, limit = offset + len(piece), limit - len(piece)
        yield len(piece)
        if not limit:
            return


def _ended_early(response: httpx.Response, left: int) -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError(f"the connection closed {left} bytes before the end of the body",
                                     request=response.request)


def _direct_socket(stream: Any) -> socket.socket | None:
    """The socket the body can be read from straight into a buffer: a plain or TLS socket whose
    bytes are the body; not the outer socket of TLS tunnelled in TLS (an https:// proxy's socket,
    whose bytes are the registry's TLS records, still sealed: the tunnelled session is an
    ssl.SSLObject of its own, over memory buffers)."""
    sock = stream.get_extra_info("socket")
    sealed = stream.get_extra_info("ssl_object")
    if isinstance(sock, ssl.SSLSocket):
        return None if isinstance(sealed, ssl.SSLObject) else sock
    if isinstance(sock, socket.socket) and sealed is None:
        return sock
    return None


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite may write less than asked (signals, quotas); loop until all of it is in the file."""
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written
