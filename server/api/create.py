"""Ollama's create and blob endpoints: `POST /api/create`, `HEAD`/`POST /api/blobs/:digest`.

Handlers parse and answer; the work is in `registry.create` (building models) and the blob
store. A blob upload is streamed to disk while hashed, never buffered whole; a blob that exists
answers 200 before its body is read.

The server never opens a path a request names (registry/create.py says why): files arrive as
uploaded blobs or, from a client on this machine, as open files handed over a Unix socket, whose
name `GET /api/handoff` announces (registry/file_handoff.py).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import iterate_in_threadpool

from berth.registry.blobstore import CHUNK_SIZE, BlobWriter
from berth.registry.create import (
    MAX_BLOB_BYTES,
    PATHS_REFUSED,
    CreatePlan,
    ModelCreator,
    plan_from_modelfile,
    plan_from_request,
)
from berth.registry.digest import Digest
from berth.registry.errors import BlobNotFound, InvalidInput, NotFound, TooLarge
from berth.server import prompt as prompts
from berth.server.api.body import parse_json
from berth.server.api.ndjson import respond
from berth.server.api.app_context import app_context

router = APIRouter()


class CreateBody(BaseModel):
    """Both shapes of Ollama's create request (docs/ollama-compatibility.md, "API: create requests")."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str | None = None
    name: str | None = None  # deprecated alias of model
    from_: str | None = Field(default=None, alias="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    requires: str | None = None
    quantize: str | None = None
    quantization: str | None = None  # deprecated alias of quantize
    modelfile: str | None = None  # early-2024 shape
    path: str | None = None  # early-2024 shape: where the client's Modelfile was; never opened
    stream: bool | None = None

    def plan(self) -> CreatePlan:
        if self.quantize or self.quantization:
            raise InvalidInput("quantization is not supported yet; create from a GGUF file that is already quantized")
        if not self.from_ and not self.files and (self.modelfile is not None or self.path):
            return plan_from_modelfile(self.modelfile, self.path)
        return plan_from_request(
            from_=self.from_, files=self.files, adapters=self.adapters, template=self.template,
            system=self.system, parameters=self.parameters, messages=self.messages, license=self.license,
            requires=self.requires,
        )



@router.post("/api/create")
async def create(request: Request) -> Response:
    body = await parse_json(request, CreateBody)
    library = app_context(request).library
    text = body.model or body.name
    if not text:
        raise InvalidInput("model is required")
    name = await run_in_threadpool(library.resolve, text)  # reads the catalog
    plan = body.plan()
    creator = ModelCreator(library, check_template=prompts.check_template)
    progress = iterate_in_threadpool(creator.create(name, plan))
    if body.stream is not False:
        return await respond(progress, True, "status")
    return JSONResponse(await _last(progress))


async def _last(progress: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """A non-streamed create answers with its last progress message (normally success)."""
    last: dict[str, Any] = {}
    async for item in progress:
        last = item
    return last


@router.head("/api/blobs/{digest}")
async def head_blob(request: Request, digest: str) -> Response:
    parsed = Digest.parse(digest)
    if not await run_in_threadpool(app_context(request).library.blobs.exists, parsed):
        raise BlobNotFound(str(parsed))
    return Response(status_code=200)


@router.get("/api/handoff")
async def handoff(request: Request) -> dict[str, str]:
    """Where a client on this machine hands files over (Berth's own; the name is no secret: only
    a process on this machine, as the server's user, can use it)."""
    listener = app_context(request).handoff
    if listener is None:
        raise NotFound("this server takes no handed files; upload them with POST /api/blobs/<digest>")
    return {"socket": listener.name}


@router.post("/api/blobs/{digest}")
async def upload_blob(request: Request, digest: str) -> Response:
    parsed = Digest.parse(digest)
    store = app_context(request).library.blobs
    if "path" in request.query_params:
        raise InvalidInput(PATHS_REFUSED)
    if await run_in_threadpool(store.exists, parsed):
        return Response(status_code=200)  # the body is never read
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BLOB_BYTES:
        raise TooLarge(f"blob is {declared} bytes, more than the {MAX_BLOB_BYTES}-byte limit")
    writer = await run_in_threadpool(store.writer, parsed, MAX_BLOB_BYTES)
    with writer:
        await _write_body(request.stream(), writer)
        await run_in_threadpool(writer.commit)  # raises DigestMismatch; nothing is kept
    return Response(status_code=201)


async def _write_body(chunks: AsyncIterator[bytes], writer: BlobWriter) -> None:
    """Gather the body into CHUNK_SIZE pieces; write each on a worker thread while the next arrives."""
    pending: asyncio.Future[None] | None = None
    gathered: list[bytes] = []
    size = 0
    try:
        async for chunk in chunks:
            gathered.append(chunk)
            size += len(chunk)
            if size >= CHUNK_SIZE:
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(run_in_threadpool(writer.write, b"".join(gathered)))
                gathered, size = [], 0
    finally:
        # Also when the client goes away: the writer is aborted only after its last write ends.
        if pending is not None:
            await pending
    if gathered:
        await run_in_threadpool(writer.write, b"".join(gathered))
