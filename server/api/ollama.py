"""Ollama's native model-management API: health, version, tags, show, copy, delete.

Handlers stay thin: parse the body, call the library, shape the answer as Ollama does.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from berth.registry.errors import InvalidInput, ModelNotFound
from berth.registry.names import ModelName
from berth.server import __version__
from berth.server.api.body import parse_json
from berth.server.models import view
from berth.server.api.app_context import app_context

router = APIRouter()


class _Lenient(BaseModel):
    # Clients send fields we do not use (old and new API shapes); ignore them.
    model_config = ConfigDict(extra="ignore")


class ShowRequest(_Lenient):
    model: str | None = None
    name: str | None = None
    verbose: bool | None = None


class CopyRequest(_Lenient):
    source: str = ""
    destination: str = ""


class DeleteRequest(_Lenient):
    model: str | None = None
    name: str | None = None


def _model_field(model: str | None, name: str | None) -> str:
    value = model or name
    if not value:
        raise InvalidInput("model is required")
    return value



@router.api_route("/", methods=["GET", "HEAD"])
async def health() -> Response:
    return Response("Berth is running", media_type="text/plain; charset=utf-8")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(app_context(request).metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.api_route("/api/version", methods=["GET", "HEAD"])
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.api_route("/api/tags", methods=["GET", "HEAD"])
async def tags(request: Request) -> dict[str, Any]:
    library = app_context(request).library

    def build() -> list[dict[str, Any]]:
        return [view(library, stored).tag_entry() for stored in library.list()]

    return {"models": await run_in_threadpool(build)}


@router.post("/api/show")
async def show(request: Request) -> dict[str, Any]:
    body = await parse_json(request, ShowRequest)
    text = _model_field(body.model, body.name)
    library = app_context(request).library

    def build() -> dict[str, Any]:
        stored = library.get(text)
        return view(library, stored, with_info=True).show(library)

    return await run_in_threadpool(build)


@router.post("/api/copy")
async def copy(request: Request) -> Response:
    body = await parse_json(request, CopyRequest)
    library = app_context(request).library
    source = _checked_name(body.source, "source")
    destination = _checked_name(body.destination, "destination")

    def run() -> None:
        try:
            stored = library.get(source)
        except ModelNotFound:
            raise ModelNotFound(body.source, f'model "{body.source}" not found') from None
        library.copy(stored.name, library.resolve(destination))

    await run_in_threadpool(run)
    return Response(status_code=200)


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    body = await parse_json(request, DeleteRequest)
    text = _model_field(body.model, body.name)
    library = app_context(request).library

    def run() -> None:
        try:
            name = library.resolve(text)
        except InvalidInput:
            raise ModelNotFound(text) from None
        library.delete(name)

    await run_in_threadpool(run)
    return Response(status_code=200)


def _checked_name(text: str, field: str) -> str:
    if not text:
        raise InvalidInput(f"{field} is required")
    try:
        ModelName.parse(text)
    except InvalidInput as exc:
        raise InvalidInput(f'{field} "{text}" is invalid: {exc}') from None
    return text
