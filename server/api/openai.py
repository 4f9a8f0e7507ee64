"""OpenAI-compatible endpoints: chat and text completions, embeddings, models
(docs/ollama-compatibility.md, "OpenAI compatibility").

Each handler translates the request (server/openai_shapes.py), calls the same services as the
native API and translates the answer back. Errors use OpenAI's envelope on these paths only:
`OpenAIRoute` catches them before Ollama's handlers in server/api/errors.py would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import aclosing
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from berth.registry.errors import BerthError, InvalidField, InvalidInput, ModelNotFound
from berth.server import openai_shapes as shapes
from berth.server.api.body import parse_json
from berth.server.api.caller import caller_of
from berth.server.api.disconnect import ClientGone, nobody_listening, unless_disconnected
from berth.server.api.errors import status_for
from berth.server.inference import Generation, normalize
from berth.server.api.app_context import app_context

log = logging.getLogger("berth.api")


def _error(error: Exception) -> tuple[int, dict[str, Any]]:
    """The status and OpenAI error body for any failure; statuses as on the native API."""
    if isinstance(error, BerthError):
        status, message = status_for(error), error.message
    else:
        log.error("unexpected error", exc_info=error)
        status, message = 500, f"internal error ({type(error).__name__}); the server's log has the details"
    return status, shapes.error_body(status, message, error.field if isinstance(error, InvalidField) else None)


class OpenAIRoute(APIRoute):
    """A route whose failures answer in OpenAI's error shape, with the status Ollama would use."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def shaped(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every failure gets the OpenAI envelope
                status, body = _error(exc)
                return JSONResponse(body, status_code=status)

        return shaped


router = APIRouter(route_class=OpenAIRoute)



def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


async def _translated(first: dict[str, Any], chunks: AsyncIterator[dict[str, Any]],
                      translator: shapes.Translator) -> AsyncIterator[dict[str, Any]]:
    for event in translator.events(first):
        yield event
    async for chunk in chunks:
        for event in translator.events(chunk):
            yield event
    for event in translator.closing_events():
        yield event


async def _drain(events: AsyncIterator[dict[str, Any]]) -> None:
    async for _ in events:
        pass


async def _answer(chunks: AsyncIterator[dict[str, Any]], translator: shapes.Translator, stream: bool,
                  request: Request | None = None) -> Response:
    """Server-sent events ending in `[DONE]`, or one object. As natively, the first chunk is
    awaited before answering, so a bad model or option still gets its proper status; a client
    that leaves before its one object is ready stops the work."""
    try:
        first = await unless_disconnected(request, anext(chunks))
    except StopAsyncIteration:
        raise BerthError("no response from the model") from None
    except ClientGone:
        await chunks.aclose()
        return nobody_listening()
    events = _translated(first, chunks, translator)
    if not stream:
        async with aclosing(chunks), aclosing(events):
            try:
                await unless_disconnected(request, _drain(events))
            except ClientGone:
                return nobody_listening()
        return JSONResponse(translator.response())

    async def body() -> AsyncIterator[bytes]:
        async with aclosing(chunks), aclosing(events):
            try:
                async for event in events:
                    yield _sse(event)
                yield b"data: [DONE]\n\n"
            except Exception as exc:  # noqa: BLE001 - the status is sent; OpenAI's clients raise on this event
                yield _sse(_error(exc)[1])

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = await parse_json(request, shapes.ChatCompletionRequest)
    job = dataclasses.replace(shapes.chat_input(body), caller=caller_of(request))
    chunks = Generation(app_context(request).inference).chat(job)
    return await _answer(chunks, shapes.ChatTranslator(body.include_usage), bool(body.stream), request)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    body = await parse_json(request, shapes.CompletionRequest)
    job = dataclasses.replace(shapes.generate_input(body), caller=caller_of(request))
    chunks = Generation(app_context(request).inference).generate(job)
    return await _answer(chunks, shapes.CompletionTranslator(body.include_usage), bool(body.stream), request)


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    body = await parse_json(request, shapes.EmbeddingRequest)
    encoding = body.encoding()
    inputs = shapes.embedding_inputs(body)
    if body.dimensions is not None and body.dimensions < 0:
        raise InvalidInput("dimensions must be a positive number")
    inference = app_context(request).inference
    plan = inference.plan(inference.resolve(body.model_name()), None, None)
    vectors, prompt_tokens, _ = await inference.embed(plan, inputs, True, caller_of(request))
    normalized = [normalize(vector, body.dimensions) for vector in vectors]
    return JSONResponse(shapes.embedding_list(plan.ref.name.display, normalized, prompt_tokens, encoding))


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    library = app_context(request).library
    stored = await run_in_threadpool(library.list)
    return {"object": "list", "data": [shapes.model_entry(model) for model in stored]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    library = app_context(request).library
    try:
        stored = await run_in_threadpool(library.get, model)
    except InvalidInput:
        # A name that cannot exist is simply not there, as for generate and chat.
        raise ModelNotFound(model) from None
    return shapes.model_entry(stored)
