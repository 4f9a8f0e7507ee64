"""One place that turns exceptions into Ollama's error bodies: `{"error": "..."}` with a status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from berth.registry.errors import BerthError, Conflict, CorruptData, InvalidInput, NotFound, SchemaTooNew
from berth.server.crash_guard import RequestRefused
from berth.server.scheduler import QueueFull

log = logging.getLogger("berth.api")


def status_for(error: BerthError) -> int:
    if isinstance(error, QueueFull):
        return 503
    if isinstance(error, RequestRefused):
        return 429
    if isinstance(error, InvalidInput):
        return 400
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, Conflict):
        return 409
    if isinstance(error, (CorruptData, SchemaTooNew)):
        return 500
    return 500


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def install(app: FastAPI) -> None:
    @app.exception_handler(BerthError)
    async def _berth_error(_request: Request, exc: BerthError) -> Response:
        status = status_for(exc)
        if status >= 500:
            log.error("%s: %s", type(exc).__name__, exc)
        return error_response(status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        # Gin's plain-text answers for unknown paths and wrong methods, which clients expect.
        if exc.status_code == 404:
            return PlainTextResponse("404 page not found", status_code=404)
        if exc.status_code == 405:
            return PlainTextResponse("405 method not allowed", status_code=405)
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        # The exception's text stays in the log: it may quote a file or the server's internals.
        return error_response(500, f"internal error ({type(exc).__name__}); the server's log has the details")
