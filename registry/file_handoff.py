"""Handing files on the server's own machine to it as open files, so it links rather than copies them.

`berth create` on the server's machine would otherwise upload gigabytes the server could link.
The server must not open a path a client names (it would read with its own rights, and a client
could learn what exists on the host), so the client opens the files itself and passes the open
descriptors over a Unix socket (SCM_RIGHTS, unix(7)). What the server receives is exactly what
the client could read; it stages each into the blob store (a reflink, a hard link of that very
inode, or a copy: registry/adopt.py), hashes it and answers with its digest. The create request
then names the files by digest, like uploaded blobs.

* The socket is in Linux's abstract namespace under a random name the server announces over
  HTTP (`GET /api/handoff`). A client whose HTTP connection is tunnelled from another machine
  finds no such socket on its own machine and uploads instead.
* Only peers running as the server's own user (or root) are served (SO_PEERCRED): a hard link
  shares the inode with the client's file, which its owner can still change, so only the
  server's own user may put such a blob in the server's store. Other users upload.
* Messages are one datagram each way (SOCK_SEQPACKET): a request
  `{"files": ["model.gguf", ...]}` with one descriptor per name, at most MAX_FILES; the answer
  `{"files": [{"digest": "sha256:...", "size": N, "method": "hardlink"}, ...]}` or `{"error": "..."}`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

from berth.registry.adopt import stage_descriptor
from berth.registry.blobstore import BlobStore
from berth.registry.bounded_json import decode
from berth.registry.errors import BerthError

log = logging.getLogger("berth.handoff")

MAX_FILES = 16
MAX_MESSAGE = 64 * 1024
MAX_CONNECTIONS = 32  # open at once; more are closed at once (the client then uploads)
MAX_HASHING = 2  # connections whose files are staged and hashed at once
REQUEST_TIMEOUT = 30.0  # seconds a client has to send its request once connected
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class HandoffError(BerthError):
    """The server refused or could not take the handed files."""


def supported() -> bool:
    return hasattr(socket, "SO_PEERCRED") and hasattr(socket, "AF_UNIX") and hasattr(socket, "send_fds")


@dataclass(frozen=True)
class Received:
    """One handed file as it is now in the store."""

    digest: str
    size: int
    method: str


class HandoffServer:
    """The server's listener: accepts handed files into `store` until `close`."""

    def __init__(self, store: BlobStore, max_size: int) -> None:
        self.store = store
        self.max_size = max_size
        # Announced as "@name"; the leading NUL puts it in the abstract namespace.
        self.name = f"@berth-handoff-{secrets.token_hex(12)}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._listener.bind("\0" + self.name[1:])
        self._listener.listen(16)
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._hashing = threading.BoundedSemaphore(MAX_HASHING)
        self._closed = threading.Event()
        threading.Thread(target=self._accept_loop, name="file-handoff", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._connections.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="file-handoff-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            with conn:
                conn.settimeout(REQUEST_TIMEOUT)
                # Read first, refuse after: a reply while the request sits unread resets the connection.
                data, fds, flags, _ = socket.recv_fds(conn, MAX_MESSAGE, MAX_FILES)
                pid, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
                if uid not in (os.getuid(), 0):
                    _reply(conn, {"error": "this server takes handed files only from its own user; upload them"})
                    return
                try:
                    with self._hashing:
                        received = self._take(data, fds, flags)
                except BerthError as exc:
                    _reply(conn, {"error": exc.message})
                    return
                log.info("took %d handed file(s) from process %d", len(received), pid)
                _reply(conn, {"files": [dataclasses.asdict(item) for item in received]})
        except OSError as exc:
            log.warning("a file handoff failed: %s", exc.strerror or exc)
        finally:
            for fd in fds:
                os.close(fd)
            self._connections.release()

    def _take(self, data: bytes, fds: list[int], flags: int) -> list[Received]:
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise HandoffError(f"hand over at most {MAX_FILES} files in a request of at most {MAX_MESSAGE} bytes")
        try:
            request = decode(data)
        except ValueError:
            raise HandoffError("the handoff request is not JSON") from None
        names = request.get("files") if isinstance(request, dict) else None
        if not isinstance(names, list) or len(names) != len(fds) or not all(isinstance(n, str) for n in names):
            raise HandoffError("the handoff request names one file per descriptor sent")
        received: list[Received] = []
        for name, fd in zip(names, fds):
            with stage_descriptor(self.store, fd, f"the handed file {name!r}", self.max_size) as staged:
                stored = staged.publish()
                received.append(Received(str(stored.digest), stored.size, staged.method))
        return received


def hand_over(name: str, paths: list[str], timeout: float | None = None) -> list[Received]:
    """Open `paths` here and hand them to the server listening at `name` (as announced); their
    digests in the store, in order. OSError when the socket cannot be reached (no such server on
    this machine), HandoffError when the server refuses."""
    if not name.startswith("@") or not supported():
        raise HandoffError("the server offers no file handoff this client can use")
    opened: list[int] = []
    try:
        for path in paths:
            opened.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as conn:
            conn.settimeout(timeout)
            conn.connect("\0" + name[1:])
            names = [os.path.basename(path) for path in paths]
            socket.send_fds(conn, [json.dumps({"files": names}).encode()], opened)
            answer = _answer(conn.recv(MAX_MESSAGE))
    finally:
        for fd in opened:
            os.close(fd)
    if "error" in answer:
        raise HandoffError(str(answer["error"]))
    files = answer.get("files")
    if not isinstance(files, list) or len(files) != len(paths):
        raise HandoffError("the server's handoff answer does not list the files")
    return [Received(str(item["digest"]), int(item["size"]), str(item["method"])) for item in files]


def _answer(data: bytes) -> dict[str, Any]:
    try:
        answer = decode(data)
    except ValueError:
        raise HandoffError("the server's handoff answer is not JSON") from None
    if not isinstance(answer, dict):
        raise HandoffError("the server's handoff answer is not a JSON object")
    return answer


def _reply(conn: socket.socket, message: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(message).encode())
    except OSError:
        pass  # the client left; nothing to tell
