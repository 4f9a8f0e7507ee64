"""Ollama's create and blob endpoints: `POST /api/create`, `HEAD`/`POST /api/blobs/:digest`.

Handlers parse and answer; the work is in `registry.create` (building models) and the blob
store. A blob upload is streamed to disk while hashed, never buffered whole; a blob that exists
answers 200 before its body is read.

Berth extension, for clients on the server's own machine only (the peer address is loopback):
`POST /api/blobs/<digest>?path=<absolute path>` adopts a file from the server's disk (linked
rather than copied, verified against the digest), and in `/api/create` a `files`/`adapters`
value may be such a path, with `file_identities: {path: {device, inode, size, mtime_ns}}` saying
what the client saw there (so that a server reached through an SSH tunnel, which also sees a
loopback peer, refuses rather than uses its own file at the same path). Anyone else gets the same
refusal whatever the path, before the filesystem is consulted. (Behind a reverse proxy on the
same machine every client looks local: do not put one in front of a server others can reach.)
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import iterate_in_threadpool

from registry.adopt import adopt
from registry.blobstore import CHUNK_SIZE, BlobWriter
from registry.create import (
    MAX_BLOB_BYTES,
    REMOTE_PATH_REFUSED,
    CreatePlan,
    ModelCreator,
    plan_from_modelfile,
    plan_from_request,
)
from registry.digest import Digest
from registry.errors import BlobNotFound, InvalidInput, TooLarge
from server import template as templates
from server.api.body import parse_json
from server.api.ndjson import respond
from server.context import AppContext

router = APIRouter()


class CreateBody(BaseModel):
    """Both shapes of Ollama's create request (spec/ollama-api.md §2.4)."""

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
    file_identities: dict[str, dict[str, int]] | None = None  # Berth: what a local client saw at each path
    quantize: str | None = None
    quantization: str | None = None  # deprecated alias of quantize
    modelfile: str | None = None  # early-2024 shape
    path: str | None = None  # early-2024 shape: a Modelfile on the server's disk
    stream: bool | None = None

    def plan(self, remote: bool) -> CreatePlan:
        if self.quantize or self.quantization:
            raise InvalidInput("quantization is not supported yet; create from a GGUF file that is already quantized")
        if not self.from_ and not self.files and (self.modelfile is not None or self.path):
            return plan_from_modelfile(self.modelfile, self.path, remote=remote)
        return plan_from_request(
            from_=self.from_, files=self.files, adapters=self.adapters, template=self.template,
            system=self.system, parameters=self.parameters, messages=self.messages, license=self.license,
            requires=self.requires, file_identities=self.file_identities, remote=remote,
        )


def _context(request: Request) -> AppContext:
    return request.app.state.context


def is_loopback_client(request: Request) -> bool:
    """Whether the peer is this machine (127.0.0.0/8, ::1, or ::ffff:127.x)."""
    if request.client is None:
        return False
    try:
        address = ipaddress.ip_address(request.client.host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _check_template(text: str) -> None:
    try:
        templates.parse(text)
    except templates.TemplateError as exc:
        raise InvalidInput(f"template error: {exc}") from None


@router.post("/api/create")
async def create(request: Request) -> Response:
    body = await parse_json(request, CreateBody)
    library = _context(request).library
    remote = not is_loopback_client(request)
    text = body.model or body.name
    if not text:
        raise InvalidInput("model is required")
    # Both may read the catalog or (loopback only) a Modelfile from disk.
    name = await run_in_threadpool(library.resolve, text)
    plan = await run_in_threadpool(body.plan, remote)
    creator = ModelCreator(library, check_template=_check_template)
    progress = iterate_in_threadpool(creator.create(name, plan, remote=remote))
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
    if not await run_in_threadpool(_context(request).library.blobs.exists, parsed):
        raise BlobNotFound(str(parsed))
    return Response(status_code=200)


@router.post("/api/blobs/{digest}")
async def upload_blob(request: Request, digest: str, path: str | None = None) -> Response:
    parsed = Digest.parse(digest)
    store = _context(request).library.blobs
    if path is not None and not is_loopback_client(request):
        raise InvalidInput(REMOTE_PATH_REFUSED)
    if await run_in_threadpool(store.exists, parsed):
        return Response(status_code=200)  # the body is never read
    if path is not None:
        if not Path(path).is_absolute():
            raise InvalidInput(f"path must be absolute, not {path!r}")  # the server's folder is not the client's
        await run_in_threadpool(adopt, store, Path(path), parsed, MAX_BLOB_BYTES)
        return Response(status_code=201)
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
