"""The OCI distribution read API under `/v2/`, so other hosts (another Berth, skopeo, oras) pull
models from this one: `berth pull gpu-box:11434/library/gemma3:270m --insecure`.

Repository names are `namespace/model`, checked with the model-name grammar before any lookup;
the registry host part of a local name is not part of the repository (whoever serves it is the
host). Blobs are served only for repositories whose manifests reference them, with Range support.
Errors use the distribution spec's `{"errors": [{"code", "message"}]}` shape.
"""

from __future__ import annotations

import os
import re
from typing import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from berth.registry.digest import Digest
from berth.registry.errors import InvalidInput
from berth.registry.library import Library, StoredModel
from berth.registry.names import DEFAULT_HOST, ModelName
from berth.server.api.app_context import app_context

router = APIRouter()

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_READ_SIZE = 1024 * 1024


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"errors": [{"code": code, "message": message, "detail": None}]}, status_code=status,
                        headers={"Docker-Distribution-API-Version": "registry/2.0"})


def _library(request: Request) -> Library:
    return app_context(request).library


def _repository(repository: str) -> tuple[str, str] | None:
    """(namespace, model) of a valid `namespace/model` repository path, else None."""
    parts = repository.split("/")
    if len(parts) != 2:
        return None
    try:
        ModelName.parse(f"{parts[0]}/{parts[1]}")
    except InvalidInput:
        return None
    return parts[0], parts[1]


def _models_in(library: Library, namespace: str, model: str) -> list[StoredModel]:
    """The local models of a repository, the default registry's first (they win on a tag clash)."""
    found = [m for m in library.list()
             if m.name.namespace.lower() == namespace.lower() and m.name.model.lower() == model.lower()]
    return sorted(found, key=lambda m: m.name.host.lower() != DEFAULT_HOST)


@router.api_route("/v2/", methods=["GET", "HEAD"])
async def version_check() -> Response:
    return JSONResponse({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})


@router.get("/v2/_catalog")
async def catalog(request: Request) -> Response:
    models = await run_in_threadpool(_library(request).list)
    names = sorted({f"{m.name.namespace}/{m.name.model}" for m in models})
    return JSONResponse({"repositories": names})


@router.get("/v2/{repository:path}/tags/list")
async def tags_list(request: Request, repository: str) -> Response:
    parsed = _repository(repository)
    models = await run_in_threadpool(_models_in, _library(request), *parsed) if parsed else []
    if not models:
        return _error(404, "NAME_UNKNOWN", f"repository {repository!r} is not known here")
    return JSONResponse({"name": repository, "tags": sorted({m.name.tag for m in models})})


@router.api_route("/v2/{repository:path}/manifests/{reference}", methods=["GET", "HEAD"])
async def manifest(request: Request, repository: str, reference: str) -> Response:
    parsed = _repository(repository)
    if parsed is None:
        return _error(404, "NAME_UNKNOWN", f"repository {repository!r} is not known here")
    models = await run_in_threadpool(_models_in, _library(request), *parsed)
    if reference.startswith("sha256:"):
        try:
            wanted = Digest.parse(reference)
        except InvalidInput as exc:
            return _error(400, "DIGEST_INVALID", str(exc))
        chosen = next((m for m in models if m.manifest.digest == wanted), None)
    else:
        chosen = next((m for m in models if m.name.tag.lower() == reference.lower()), None)
    if chosen is None:
        return _error(404, "MANIFEST_UNKNOWN", f"manifest {reference!r} of {repository!r} is not known here")
    raw = chosen.manifest.raw
    headers = {"Docker-Content-Digest": str(chosen.manifest.digest), "Content-Length": str(len(raw)),
               "Docker-Distribution-API-Version": "registry/2.0"}
    body = b"" if request.method == "HEAD" else raw
    return Response(body, media_type=chosen.manifest.media_type, headers=headers)


@router.api_route("/v2/{repository:path}/blobs/{digest}", methods=["GET", "HEAD"])
async def blob(request: Request, repository: str, digest: str) -> Response:
    parsed = _repository(repository)
    if parsed is None:
        return _error(404, "NAME_UNKNOWN", f"repository {repository!r} is not known here")
    try:
        wanted = Digest.parse(digest)
    except InvalidInput as exc:
        return _error(400, "DIGEST_INVALID", str(exc))
    library = _library(request)
    models = await run_in_threadpool(_models_in, library, *parsed)
    if not any(wanted in {d.digest for d in m.manifest.blobs()} for m in models):
        return _error(404, "BLOB_UNKNOWN", f"blob {digest} is not part of {repository!r} here")
    path = library.blob_path(wanted)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return _error(404, "BLOB_UNKNOWN", f"blob {digest} is missing from the store; run `berth fsck`")
    headers = {"Docker-Content-Digest": str(wanted), "Accept-Ranges": "bytes",
               "Docker-Distribution-API-Version": "registry/2.0"}
    start, end, status = 0, size - 1, 200
    range_header = request.headers.get("range")
    if range_header:
        match = _RANGE.fullmatch(range_header.strip())
        if not match or (not match.group(1) and not match.group(2)):
            return _range_error(size)
        if match.group(1):
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        else:  # a suffix range: the last N bytes
            start = max(size - int(match.group(2)), 0)
        if start > end or start >= size:
            return _range_error(size)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    if request.method == "HEAD":
        return Response(b"", status_code=status, headers=headers, media_type="application/octet-stream")
    return StreamingResponse(_read(str(path), start, end), status_code=status, headers=headers,
                             media_type="application/octet-stream")


def _range_error(size: int) -> Response:
    response = _error(416, "RANGE_INVALID", f"the requested range is not within the blob's {size} bytes")
    response.headers["Content-Range"] = f"bytes */{size}"
    return response


async def _read(path: str, start: int, end: int) -> AsyncIterator[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        position = start
        while position <= end:
            chunk = await run_in_threadpool(os.pread, fd, min(_READ_SIZE, end - position + 1), position)
            if not chunk:
                break
            position += len(chunk)
            yield chunk
    finally:
        os.close(fd)
