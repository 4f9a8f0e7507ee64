"""Ollama's inference endpoints: generate, chat, embed, embeddings, ps.

Streaming follows Ollama: NDJSON by default; an error before the first line gets its proper
status and `{"error": ...}`; an error after it is a final `{"error": ...}` line; `stream: false`
answers once with the whole response.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from berth.registry.errors import InvalidInput
from berth.server import prompt as prompts
from berth.server.api.body import parse_json
from berth.server.api.caller import caller_of
from berth.server.api.ndjson import respond
from berth.server.durations import parse_keep_alive
from berth.server.images import decode_images
from berth.server.inference import ChatInput, GenerateInput, Generation, OutputOptions, normalize
from berth.server.context import AppContext
from berth.server.api.app_context import app_context

log = logging.getLogger("berth.api")
router = APIRouter()


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = None
    options: dict[str, Any] | None = None
    keep_alive: Any = None
    stream: bool | None = None

    def model_name(self) -> str:
        value = self.model or self.name
        if not value:
            raise InvalidInput("model is required")
        return value


class _GenerationRequest(_Request):
    """Fields generate and chat share since Ollama 0.12."""

    truncate: bool | None = None
    shift: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    debug_render_only: bool | None = Field(default=None, alias="_debug_render_only")

    def outputs(self) -> OutputOptions:
        return OutputOptions.parse(self.shift, self.logprobs, self.top_logprobs, self.debug_render_only)


class GenerateBody(_GenerationRequest):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    format: Any = None
    images: list[str] | None = None
    think: bool | str | None = None


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: dict[str, Any] = {}
    index: int | None = None


class ToolCallBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    function: ToolCallFunction


class MessageBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None
    thinking: str | None = None

    @field_validator("role")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


class ChatBody(_GenerationRequest):
    messages: list[MessageBody] | None = None
    tools: list[dict[str, Any]] | None = None
    format: Any = None
    think: bool | str | None = None
    template: str | None = None


class EmbedBody(_Request):
    input: Any = None
    truncate: bool | None = None
    dimensions: int | None = None


class EmbeddingsBody(_Request):
    prompt: str | None = None



def _keep_alive(body: _Request, context: AppContext) -> float | None:
    return None if body.keep_alive is None else parse_keep_alive(body.keep_alive, context.settings.keep_alive)


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    body = await parse_json(request, GenerateBody)
    context = app_context(request)
    job = GenerateInput(
        model=body.model_name(),
        prompt=body.prompt or "",
        suffix=body.suffix or "",
        system=body.system,
        template=body.template,
        context=tuple(body.context or ()),
        raw=bool(body.raw),
        format=body.format,
        images=decode_images(body.images),
        options=body.options,
        keep_alive=_keep_alive(body, context),
        truncate=body.truncate is not False,
        think=body.think,
        outputs=body.outputs(),
        caller=caller_of(request),
    )
    return await respond(Generation(context.inference).generate(job), body.stream is not False, "response", request)


def _chat_message(body: MessageBody, index: int) -> prompts.ChatMessage:
    from berth.server.tools import ToolCall

    calls = tuple(
        ToolCall(id=call.id or "", name=call.function.name, arguments=call.function.arguments,
                 index=call.function.index if call.function.index is not None else i)
        for i, call in enumerate(body.tool_calls or [])
    )
    return prompts.ChatMessage(role=body.role, content=body.content or "",
                               images=decode_images(body.images, f"messages.{index}.images"), tool_calls=calls,
                               tool_name=body.tool_name, tool_call_id=body.tool_call_id, thinking=body.thinking)


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    body = await parse_json(request, ChatBody)
    context = app_context(request)
    job = ChatInput(
        model=body.model_name(),
        messages=tuple(_chat_message(m, i) for i, m in enumerate(body.messages or [])),
        tools=tuple(body.tools or ()),
        format=body.format,
        options=body.options,
        keep_alive=_keep_alive(body, context),
        truncate=body.truncate is not False,
        think=body.think,
        template=body.template,
        outputs=body.outputs(),
        caller=caller_of(request),
    )
    return await respond(Generation(context.inference).chat(job), body.stream is not False, "message", request)


def _inputs(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise InvalidInput("invalid input type")


@router.post("/api/embed")
async def embed(request: Request) -> Response:
    body = await parse_json(request, EmbedBody)
    context = app_context(request)
    inference = context.inference
    inputs = _inputs(body.input)
    started = time.perf_counter_ns()
    plan = inference.plan(inference.resolve(body.model_name()), body.options, _keep_alive(body, context))
    if not inputs:
        await inference.load_or_unload(plan, "embeddings", [])
        return JSONResponse({"model": plan.ref.name.display, "embeddings": []})
    if body.dimensions is not None and body.dimensions < 0:
        raise InvalidInput("dimensions must be a positive number")
    vectors, count, load_ns = await inference.embed(plan, inputs, body.truncate is not False, caller_of(request))
    return JSONResponse({
        "model": plan.ref.name.display,
        "embeddings": [normalize(v, body.dimensions) for v in vectors],
        "total_duration": time.perf_counter_ns() - started,
        "load_duration": load_ns,
        "prompt_eval_count": count,
    })


@router.post("/api/embeddings")
async def embeddings(request: Request) -> Response:
    body = await parse_json(request, EmbeddingsBody)
    context = app_context(request)
    inference = context.inference
    plan = inference.plan(inference.resolve(body.model_name()), body.options, _keep_alive(body, context))
    if not body.prompt:
        await inference.load_or_unload(plan, "embedding", [])
        return JSONResponse({"embedding": []})
    vectors, _, _ = await inference.embed(plan, [body.prompt], True, caller_of(request))
    return JSONResponse({"embedding": vectors[0]})


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    return {"models": app_context(request).scheduler.running()}


