"""`POST /api/pull` and `POST /api/push`: Ollama's request fields and NDJSON progress.

Pull and push run on a worker thread (registry/pull.py explains why they are synchronous); their
progress events cross to the event loop through a queue. An error before the first event gets its
proper status and `{"error": ...}`; after it, a final `{"error": ...}` line. `stream: false` answers
once with the last event. A client that disconnects cancels its share of the work (a shared
download stops only when nobody waits for it any more; its partial file stays for a resume).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from berth.registry.errors import BerthError, InvalidInput
from berth.registry.names import ModelName
from berth.registry.oci import RegistryUnauthorized
from berth.registry.pull import Emit, Event, PullResult
from berth.registry.push import PushResult
from berth.registry.rate import parse_rate
from berth.registry.trust import UntrustedModel
from berth.server.api.body import parse_json
from berth.server.api.ndjson import respond
from berth.server.api.errors import status_for
from berth.server.api.app_context import app_context

router = APIRouter()

Work = Callable[[Emit, threading.Event], object]


class PullBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # username/password exist in Ollama's API and are ignored

    model: str | None = None
    name: str | None = None
    insecure: bool | None = None
    stream: bool | None = None
    # Berth's addition: a cap for this pull, bytes/s as a number or text such as "50M" (registry/rate.py).
    max_rate: int | str | None = None

    def model_name(self) -> ModelName:
        text = self.model or self.name
        if not text:
            raise InvalidInput("model is required")
        return ModelName.parse(text)

    def rate(self) -> int | None:
        if isinstance(self.max_rate, int):
            if self.max_rate < 0:
                raise InvalidInput("max_rate must not be negative")
            return self.max_rate or None
        return parse_rate(self.max_rate)


class PushBody(PullBody):
    oci: bool | None = None
    # Berth's addition: sign the pushed manifest (with BERTH_SIGNING_KEY, else the server user's key);
    # absent means "as BERTH_SIGNING_KEY says": signed when it is set.
    sign: bool | None = None


async def _events(work: Work) -> AsyncIterator[Event]:
    """Run `work` on its own thread and yield its events; closing the iterator cancels the work."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancel = threading.Event()

    def put(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:
            cancel.set()  # the loop is gone (server shutting down)

    def run() -> None:
        try:
            work(lambda event: put("event", event), cancel)
            put("done", None)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the event loop
            put("error", exc)

    threading.Thread(target=run, name="registry-transfer", daemon=True).start()
    try:
        while True:
            kind, value = await queue.get()
            if kind == "event":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        cancel.set()


def _error_status(exc: BerthError) -> int:
    if isinstance(exc, RegistryUnauthorized):
        return 401
    return 403 if isinstance(exc, UntrustedModel) else status_for(exc)


async def _run(work: Work, stream: bool, request: Request, direction: str) -> Response:
    counter = app_context(request).metrics.transfer_bytes.labels(direction)

    def counted(emit: Emit, cancel: threading.Event) -> object:
        result = work(emit, cancel)
        # What actually crossed the network: blobs already present, mounted or resumed count nothing.
        if isinstance(result, PullResult):
            counter.inc(result.fetched_bytes)
        elif isinstance(result, PushResult):
            counter.inc(result.uploaded_bytes)
        return result

    try:
        return await respond(_events(counted), stream, request=request)
    except BerthError as exc:
        return JSONResponse({"error": exc.message}, status_code=_error_status(exc))


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    body = await parse_json(request, PullBody)
    name = body.model_name()
    puller = app_context(request).transfers().puller
    rate = body.rate()
    return await _run(lambda emit, cancel: puller.pull(name, emit, bool(body.insecure), cancel, rate),
                      body.stream is not False, request, "pull")


@router.post("/api/push")
async def push(request: Request) -> Response:
    body = await parse_json(request, PushBody)
    name = body.model_name()
    library = app_context(request).library
    transfers = app_context(request).transfers()

    def work(emit: Emit, cancel: threading.Event) -> object:
        key = transfers.key_for_push(body.sign)  # read (or created) on the worker thread
        return transfers.pusher.push(library.resolve(str(name)), emit, bool(body.insecure), bool(body.oci), cancel,
                                     key)

    return await _run(work, body.stream is not False, request, "push")
