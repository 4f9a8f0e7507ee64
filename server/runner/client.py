"""The API process's side of a runner: start it, send it work, stream its answers into asyncio.

A reader thread receives every message from the runner and hands it to the asyncio queue of the
request it belongs to. When the runner dies, every request it was serving gets a clean error and
the handle is marked dead, so the scheduler starts a fresh runner for the next request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, AsyncIterator

from berth.registry.errors import BerthError, InvalidInput
from berth.server.runner.process import runner_main
from berth.server.runner.protocol import LoadSpec

log = logging.getLogger("berth.runner")


class RunnerError(BerthError):
    """The runner failed to load, crashed, or reported an error for a request."""


class RunnerDied(RunnerError):
    """The runner process ended while the request was in flight."""


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[dict[str, Any]]


class RunnerProcess:
    """One runner process and the requests in flight on it."""

    def __init__(self, spec: LoadSpec, label: str) -> None:
        self.spec = spec
        self.label = label
        self.info: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._dead_reason: str | None = None
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process: BaseProcess = context.Process(target=runner_main, args=(child_conn, spec),
                                                     name=f"berth-runner {label}", daemon=True)
        self._child_conn: Connection = child_conn

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float) -> None:
        """Start the process and wait until the model is loaded (blocking; run in a thread)."""
        self._process.start()
        self._child_conn.close()
        if not self._conn.poll(timeout):
            self.kill()
            raise RunnerError(f"timed out after {timeout:.0f}s loading {self.label}")
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise RunnerError(
                f"the runner for {self.label} exited while loading (exit code {self._process.exitcode}); "
                "the model file may be damaged or too large for this machine"
            ) from None
        if message.get("type") != "ready":
            self._process.join(5)
            raise RunnerError(f"failed to load {self.label}: {message.get('message', message)}")
        self.info = message
        threading.Thread(target=self._read_loop, name=f"runner-reader {self.label}", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._dead_reason is None and self._process.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the runner to exit; kill it if it does not. Ending the process frees its memory."""
        if self._process.is_alive():
            try:
                with self._send_lock:
                    self._conn.send({"op": "shutdown"})
            except (OSError, ValueError):
                pass
            self._process.join(timeout)
        self.kill()

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._mark_dead("was stopped")
        self._conn.close()

    # -- requests -------------------------------------------------------------------------------

    async def stream(self, op: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Send one request and yield its messages until `done`, `result` or `error`.

        Closing the iterator early (a client that went away) cancels the request in the runner.
        """
        request_id = next(self._ids)
        pending = _Pending(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self._dead_reason is not None:
                raise RunnerError(f"the runner for {self.label} is not running: {self._dead_reason}")
            self._pending[request_id] = pending
        finished = False
        try:
            self._send({"op": op, "id": request_id, **payload})
            while True:
                message = await pending.queue.get()
                kind = message.get("type")
                if kind == "error":
                    finished = True
                    if message.get("kind") == "input":
                        raise InvalidInput(message.get("message", "invalid request"))
                    if message.get("kind") == "died":
                        raise RunnerDied(message.get("message", "the runner died"))
                    raise RunnerError(message.get("message", "runner error"))
                # Finished before the last yield: a consumer that stops there (call() returns at its
                # result) closes this generator, which must not then cancel a finished request.
                finished = kind in ("done", "result")
                yield message
                if finished:
                    return
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
            if not finished and self.alive:
                try:
                    self._send({"op": "cancel", "id": request_id})
                except RunnerError:
                    pass

    async def call(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A request with a single answer (tokenize, embed)."""
        async for message in self.stream(op, payload):
            if message.get("type") == "result":
                return message
        raise RunnerError(f"the runner for {self.label} ended {op} without a result")

    def _send(self, message: dict[str, Any]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:
            self._mark_dead(f"cannot reach it: {exc}")
            raise RunnerError(f"the runner for {self.label} is not running") from None

    def _read_loop(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            # A batch engine step's messages come together: one wake-up of each event loop for all.
            messages = message["messages"] if message.get("type") == "many" else [message]
            deliveries: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[dict[str, Any]], dict[str, Any]]]] = {}
            with self._lock:
                for item in messages:
                    pending = self._pending.get(item.get("id", -1))
                    if pending is not None:
                        deliveries.setdefault(pending.loop, []).append((pending.queue, item))
            for loop, items in deliveries.items():
                loop.call_soon_threadsafe(_deliver, items)
        self._process.join(1)
        code = self._process.exitcode
        reason = f"exited unexpectedly (exit code {code})" if code not in (0, None) else "exited"
        if code is not None and code < 0:
            reason = f"was killed by signal {-code}"
        self._mark_dead(reason)

    def _mark_dead(self, reason: str) -> None:
        with self._lock:
            if self._dead_reason is None:
                self._dead_reason = reason
                if reason != "was stopped":
                    log.warning("runner for %s %s", self.label, reason)
            waiting = list(self._pending.values())
            self._pending.clear()
        for pending in waiting:
            error = {"type": "error", "kind": "died" if reason != "was stopped" else "stopped",
                     "message": f"the runner for {self.label} {reason}; retry the request to start it again"}
            pending.loop.call_soon_threadsafe(pending.queue.put_nowait, error)


def _deliver(items: list[tuple["asyncio.Queue[dict[str, Any]]", dict[str, Any]]]) -> None:
    for queue, message in items:
        queue.put_nowait(message)
