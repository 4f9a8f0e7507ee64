"""Generation, chat and embeddings: from a request to a runner and back, without HTTP.

The route layer parses bodies and streams what these functions yield; everything about models,
options, prompts and statistics is decided here, so it can be tested without a socket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from berth.registry import options as option_table
from berth.registry.errors import InvalidField, InvalidInput, ModelNotFound
from berth.registry.library import Library
from berth.registry.manifest import ADAPTER_LAYER, MODEL_LAYER, PROJECTOR_LAYER
from berth.server import jinja_prompt
from berth.server import prompt as prompts
from berth.server import tools as tool_calls
from berth.server.crash_guard import Caller, CrashGuard, fingerprint
from berth.server.images import MAX_IMAGES, check_images
from berth.server.models import ModelView, view
from berth.server.runner.client import RunnerDied
from berth.server.runner.protocol import AUTO_SLOTS, LoadSpec, take_logprobs
from berth.server.scheduler import Lease, ModelRef, Scheduler
from berth.server.settings import Settings

log = logging.getLogger("berth.inference")

DEFAULT_TEMPLATE = "{{ .Prompt }}"
MIN_CONTEXT = 4
RESOLVED_KEPT = 64  # names remembered by Inference.resolve; more are read afresh after a clear


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Resolved:
    """A model ready to run: its view (template, system, params...) and where its files are."""

    view: ModelView
    model_path: str
    adapter_paths: tuple[str, ...]
    projector_path: str | None
    trained_context: int | None

    @property
    def name(self) -> str:
        return self.view.stored.name.display

    @property
    def template(self) -> str:
        return self.view.template or DEFAULT_TEMPLATE

    def prompt_model(self) -> prompts.PromptModel:
        history = tuple(
            prompts.ChatMessage(role=str(m.get("role", "")), content=str(m.get("content", "")))
            for m in self.view.messages
        )
        return prompts.PromptModel(template=self.template, system=self.view.system, messages=history,
                                   has_projector=self.projector_path is not None)


@dataclass(frozen=True)
class Plan:
    """One request's settled choices: the runner to use and the sampling options to send it."""

    ref: ModelRef
    sampling: dict[str, Any]
    keep_alive: float | None


def debug_render(model: str, key: str, empty: Any, rendered: str, images: int) -> dict[str, Any]:
    """`_debug_render_only`'s one answer: the prompt as it would go to the model, nothing generated."""
    info: dict[str, Any] = {"rendered_template": rendered}
    if images:
        info["image_count"] = images
    return {"model": model, "created_at": now_rfc3339(), key: empty, "done": False, "_debug_info": info}


def _logprobs_of(message: dict[str, Any]) -> dict[str, Any]:
    return {"logprobs": message["logprobs"]} if message.get("logprobs") else {}


def metrics(done: dict[str, Any], started_ns: int, load_ns: int) -> dict[str, Any]:
    """Ollama's six statistics in nanoseconds, each omitted when zero."""
    values = {
        "total_duration": time.perf_counter_ns() - started_ns,
        "load_duration": load_ns,
        "prompt_eval_count": done.get("prompt_eval_count", 0),
        "prompt_eval_duration": done.get("prompt_eval_duration", 0),
        "eval_count": done.get("eval_count", 0),
        "eval_duration": done.get("eval_duration", 0),
    }
    return {key: value for key, value in values.items() if value}


class Inference:
    def __init__(self, library: Library, scheduler: Scheduler, settings: Settings) -> None:
        self.library = library
        self.scheduler = scheduler
        self.settings = settings
        self.crashes = CrashGuard()
        # What each requested name resolved to, and the catalog version it was read at: reading
        # a model's tag, manifest and layers was half of the API's own work per request.
        self._resolved: dict[str, tuple[int, Resolved]] = {}

    # -- resolving ------------------------------------------------------------------------------

    def resolve(self, model: str) -> Resolved:
        """The model a request names, read again only after the catalog changed."""
        version = self.library.catalog_version()
        cached = self._resolved.get(model)
        if cached is not None and cached[0] == version:
            return cached[1]
        resolved = self._read(model)
        if len(self._resolved) >= RESOLVED_KEPT:
            self._resolved.clear()
        self._resolved[model] = (version, resolved)
        return resolved

    def _read(self, model: str) -> Resolved:
        try:
            stored = self.library.get(model)
        except InvalidInput:
            raise ModelNotFound(model) from None
        model_view = view(self.library, stored, with_info=True)
        manifest = stored.manifest
        model_layers = manifest.layers_of(MODEL_LAYER)
        if not model_layers:
            raise InvalidInput(f'"{stored.name.display}" does not support generate')
        info = model_view.model_info
        arch = str(info.get("general.architecture", ""))
        trained = info.get(f"{arch}.context_length")
        projectors = manifest.layers_of(PROJECTOR_LAYER)
        return Resolved(
            view=model_view,
            model_path=str(self.library.blob_path(model_layers[0].digest)),
            adapter_paths=tuple(str(self.library.blob_path(a.digest)) for a in manifest.layers_of(ADAPTER_LAYER)),
            projector_path=str(self.library.blob_path(projectors[0].digest)) if projectors else None,
            trained_context=int(trained) if isinstance(trained, int) and trained > 0 else None,
        )

    def plan(self, resolved: Resolved, request_options: dict[str, Any] | None, keep_alive: float | None) -> Plan:
        """Merge defaults, the model's parameters and the request's options; split load-time ones off."""
        parsed = option_table.parse_options(request_options)
        if parsed.ignored:
            log.warning("ignoring unknown or retired options: %s", ", ".join(parsed.ignored))
        model_params = option_table.parse_options(
            {k: v for k, v in resolved.view.parameters.items() if k in option_table.OPTION_SPECS}
        ).values
        merged = option_table.merge(option_table.default_options(), model_params, parsed.values)
        num_ctx = int(merged.get("num_ctx") or self.settings.context_length)
        if resolved.trained_context:
            num_ctx = min(num_ctx, resolved.trained_context)
        num_ctx = max(num_ctx, MIN_CONTEXT)
        spec = LoadSpec(
            model_path=resolved.model_path,
            adapter_paths=resolved.adapter_paths,
            projector_path=resolved.projector_path,
            num_ctx=num_ctx,
            # A batch longer than the context is never filled; llama.cpp would still allocate for it.
            num_batch=min(int(merged.get("num_batch", 512)), num_ctx),
            num_gpu=int(merged.get("num_gpu", -1)),
            main_gpu=int(merged.get("main_gpu", 0) or 0),
            use_mmap=merged.get("use_mmap") if isinstance(merged.get("use_mmap"), bool) else None,
            # More threads than CPUs only make them wait for each other (1024 took 30 s for 4 tokens).
            num_thread=min(int(merged.get("num_thread", 0) or 0), len(os.sched_getaffinity(0))),
            batch_slots=(self.settings.num_parallel or AUTO_SLOTS) if self.settings.batching else 0,
            flash_attn=self.settings.flash_attention,
            deterministic=self.settings.deterministic,
        )
        sampling = {k: (list(v) if isinstance(v, tuple) else v) for k, v in merged.items()
                    if k not in option_table.RUNNER_OPTIONS}
        ref = ModelRef(name=resolved.view.stored.name, digest=resolved.view.stored.manifest.digest, spec=spec,
                       details=resolved.view.config.details(), size=resolved.view.stored.manifest.size)
        return Plan(ref=ref, sampling=sampling, keep_alive=keep_alive)

    # -- load / unload requests -----------------------------------------------------------------

    async def load_or_unload(self, plan: Plan, key: str, empty: Any) -> dict[str, Any]:
        """Ollama's empty request: load the model (or unload it with keep_alive 0)."""
        base = {"model": plan.ref.name.display, "created_at": now_rfc3339(), key: empty, "done": True}
        if plan.keep_alive is not None and plan.keep_alive == 0:
            await self.scheduler.unload(plan.ref.digest)
            return {**base, "created_at": now_rfc3339(), "done_reason": "unload"}
        lease = await self.scheduler.acquire(plan.ref, plan.keep_alive)
        lease.release()
        return {**base, "created_at": now_rfc3339(), "done_reason": "load"}

    # -- generation -----------------------------------------------------------------------------

    async def run(self, lease: Lease, payload: dict[str, Any], caller: Caller) -> AsyncIterator[dict[str, Any]]:
        """Stream runner messages for one generation while holding a slot."""
        async with lease:
            async with self._guarded(lease, "generate", payload, caller):
                async for message in lease.runner.stream("generate", payload):
                    yield message

    @contextlib.asynccontextmanager
    async def _guarded(self, lease: Lease, op: str, payload: dict[str, Any], caller: Caller) -> AsyncIterator[None]:
        """Refuse a request that kept killing runners; record it when its runner dies under it."""
        model = lease.loaded.ref.name.display
        # Serialising and hashing the payload (a long prompt, images) is only worth it once a
        # runner has died; "" is never recorded, so it matches no death.
        request = fingerprint(op, payload) if self.crashes.has_deaths() else ""
        self.crashes.check(model, caller.client, request, caller.request_id)
        try:
            yield
        except RunnerDied:
            self.crashes.record(model, caller.client, request or fingerprint(op, payload), caller.request_id)
            raise

    async def count_tokens(self, lease: Lease, text: str) -> int:
        result = await lease.runner.call("tokenize", {"text": text})
        return len(result["tokens"])

    async def detokenize(self, lease: Lease, tokens: list[int]) -> str:
        result = await lease.runner.call("detokenize", {"tokens": tokens})
        return str(result["text"])

    async def embed(self, plan: Plan, inputs: list[str], truncate: bool,
                    caller: Caller) -> tuple[list[list[float]], int, int]:
        """Raw (un-normalised) vectors, the token count and the load duration."""
        lease = await self.scheduler.acquire(plan.ref, plan.keep_alive)
        payload = {"inputs": inputs, "truncate": truncate}
        async with lease:
            async with self._guarded(lease, "embed", payload, caller):
                result = await lease.runner.call("embed", payload)
        return result["embeddings"], int(result.get("prompt_eval_count", 0)), lease.load_duration_ns


def normalize(vector: list[float], dimensions: int | None = None) -> list[float]:
    """Cut to `dimensions` (if given) and scale to unit length, as Ollama's /api/embed."""
    if dimensions is not None and 0 < dimensions < len(vector):
        vector = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else list(vector)


def tool_parser_for(template: str, tools: list[dict[str, Any]] | None) -> tool_calls.ToolCallParser | None:
    if not tools:
        return None
    marker = tool_calls.tool_call_marker(template)
    return tool_calls.ToolCallParser(marker) if marker is not None else None


@dataclass(frozen=True)
class OutputOptions:
    """Request flags of 0.12.x that shape what a generation returns rather than the prompt."""

    shift: bool = True  # on a full context, drop older tokens (keeping num_keep) and go on
    logprobs: int | None = None  # None: none; else log-probabilities with this many alternatives
    debug_render_only: bool = False  # `_debug_render_only`: answer with the rendered prompt instead

    @classmethod
    def parse(cls, shift: bool | None, logprobs: bool | None, top_logprobs: int | None,
              debug_render_only: bool | None) -> "OutputOptions":
        top = top_logprobs or 0
        if not 0 <= top <= 20:
            raise InvalidInput("top_logprobs must be between 0 and 20")
        return cls(shift=shift is not False, logprobs=top if logprobs else None,
                   debug_render_only=bool(debug_render_only))

    def payload(self) -> dict[str, Any]:
        return {"shift": self.shift, "logprobs": self.logprobs}


@dataclass(frozen=True)
class GenerateInput:
    model: str
    prompt: str = ""
    suffix: str = ""
    system: str | None = None
    template: str | None = None
    context: tuple[int, ...] = ()
    raw: bool = False
    format: Any = None
    images: tuple[bytes, ...] = ()
    options: dict[str, Any] | None = None
    keep_alive: float | None = None
    truncate: bool = True
    think: bool | str | None = None
    outputs: OutputOptions = OutputOptions()
    caller: Caller = Caller()


@dataclass(frozen=True)
class ChatInput:
    model: str
    messages: tuple[prompts.ChatMessage, ...]
    tools: tuple[dict[str, Any], ...] = ()
    format: Any = None
    options: dict[str, Any] | None = None
    keep_alive: float | None = None
    truncate: bool = True
    think: bool | str | None = None
    # Berth's addition (the REPL's `/set template`): a template for this request only.
    template: str | None = None
    outputs: OutputOptions = OutputOptions()
    caller: Caller = Caller()


def check_token_ids(tokens: tuple[int, ...] | list[int], n_vocab: Any, field: str) -> None:
    """Token ids from a client must exist in the model's vocabulary: llama.cpp aborts the whole
    runner on one that does not."""
    if not isinstance(n_vocab, int):
        return  # the runner checks them itself too
    for index, token in enumerate(tokens):
        if not 0 <= token < n_vocab:
            raise InvalidField(f"{field}.{index}", f'"{field}" holds token id {token} at position {index}, which is '
                                                   f"not in this model's vocabulary (0 to {n_vocab - 1}); send back "
                                                   "the context a response of this model returned")


THINK_LEVELS = ("low", "medium", "high", "max")


def check_think(value: Any, resolved: "Resolved") -> bool | str | None:
    """`think`: true/false or a level; asking a model without the capability to think is a 400."""
    if value is None or value is False:
        return value
    if value is not True and value not in THINK_LEVELS:
        raise InvalidInput(f'invalid think value {value!r}; use true, false, "low", "medium", "high" or "max"')
    if "thinking" not in resolved.view.capabilities:
        raise InvalidInput(f'"{resolved.name}" does not support thinking')
    return value


# A JSON Schema becomes a llama.cpp grammar that spells out every repetition a count asks for:
# `minItems: 100000` made a grammar that took seconds to build and every token longer to sample.
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_COUNT = 1024
_SCHEMA_COUNTS = frozenset({"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties",
                            "minContains", "maxContains"})


def check_format(value: Any) -> Any:
    """`format`: absent, "" or null = free text; "json"; or a JSON Schema object, bounded in size
    and in the counts it asks for."""
    if value in (None, ""):
        return None
    if value == "json":
        return value
    if not isinstance(value, dict):
        raise InvalidInput(f'invalid format: {value!r}; expected "json" or a valid JSON Schema object')
    if len(json.dumps(value)) > MAX_SCHEMA_BYTES:
        raise InvalidField("format", f"invalid format: the JSON schema is over {MAX_SCHEMA_BYTES} bytes; simplify it")
    pending: list[Any] = [value]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            for key, item in node.items():
                if key in _SCHEMA_COUNTS and isinstance(item, (int, float)) and item > MAX_SCHEMA_COUNT:
                    raise InvalidField("format", f'invalid format: "{key}" is {item}; a schema that constrains '
                                                 f"generation may ask for at most {MAX_SCHEMA_COUNT}")
                pending.append(item)
        elif isinstance(node, list):
            pending.extend(node)
    return value


class Generation:
    """One generate or chat request, from prompt to streamed chunks."""

    def __init__(self, inference: Inference) -> None:
        self.inference = inference

    async def generate(self, request: GenerateInput) -> AsyncIterator[dict[str, Any]]:
        started = time.perf_counter_ns()
        if request.raw and (request.template or request.system or request.context):
            raise InvalidInput("raw mode does not support template, system, or context")
        fmt = check_format(request.format)
        resolved = self.inference.resolve(request.model)
        self._check_images(resolved, request.images)
        think = check_think(request.think, resolved)
        plan = self.inference.plan(resolved, request.options, request.keep_alive)
        if not request.prompt and not request.suffix and not request.images:
            yield await self.inference.load_or_unload(plan, "response", "")
            return
        lease = await self.inference.scheduler.acquire(plan.ref, plan.keep_alive)
        try:
            text, images = await self._generate_prompt(resolved, request, lease, think)
        except BaseException:
            lease.release()
            raise
        name = resolved.name
        if request.outputs.debug_render_only:
            lease.release()
            yield debug_render(name, "response", "", text, len(images))
            return
        payload = {"prompt": text, "options": plan.sampling, "format": fmt, "images": list(images),
                   "add_bos": True, **request.outputs.payload()}
        first_token: float | None = None
        async for message in self.inference.run(lease, payload, request.caller):
            if message["type"] == "token":
                first_token = first_token or (time.perf_counter_ns() - started) / 1e9
                yield {"model": name, "created_at": now_rfc3339(), "response": message["text"], "done": False,
                       **_logprobs_of(message)}
            elif message["type"] == "done":
                self.inference.scheduler.metrics.generation(name, message, first_token)
                final: dict[str, Any] = {"model": name, "created_at": now_rfc3339(), "response": "", "done": True,
                                         "done_reason": message["done_reason"]}
                if not request.raw:
                    final["context"] = message["tokens"]
                final.update(metrics(message, started, lease.load_duration_ns))
                yield final

    async def _generate_prompt(self, resolved: Resolved, request: GenerateInput, lease: Lease,
                               think: bool | str | None) -> tuple[str, tuple[bytes, ...]]:
        if request.raw:
            return request.prompt, request.images
        if request.suffix:
            template = request.template or resolved.template
            return prompts.render_suffix(template, request.prompt, request.suffix, think=think), ()
        model = resolved.prompt_model()
        messages = prompts.generate_messages(model, request.prompt, request.system, request.images,
                                             use_history=not request.context)
        if request.template is None and (gguf_template := self._gguf_template(resolved, lease)):
            # The GGUF's Jinja template sees the images as their `[img-N]` tags, as a Go template does.
            tagged, images = prompts.tag_images(messages)
            text = await self._render_gguf(gguf_template, tagged, lease, None, request.truncate)
        else:
            template = request.template or resolved.template
            if request.truncate and not request.template:
                messages = await self._fit(template, messages, lease, resolved, None)
            rendered = prompts.render_chat(template, messages, think=think)
            text, images = rendered.text, tuple(rendered.images)
        if request.context:
            check_token_ids(request.context, lease.runner.info.get("n_vocab"), "context")
            text = await self.inference.detokenize(lease, list(request.context)) + text
        return text, images

    async def chat(self, request: ChatInput) -> AsyncIterator[dict[str, Any]]:
        started = time.perf_counter_ns()
        fmt = check_format(request.format)
        resolved = self.inference.resolve(request.model)
        if request.template is not None:
            resolved = dataclasses.replace(resolved, view=dataclasses.replace(resolved.view, template=request.template))
        think = check_think(request.think, resolved)
        if request.tools and "tools" not in resolved.view.capabilities:
            raise InvalidInput(f"{resolved.view.stored.name} does not support tools")
        if sum(len(message.images) for message in request.messages) > MAX_IMAGES:
            raise InvalidInput(f"the messages carry more than {MAX_IMAGES} images, the limit for one request")
        for message in request.messages:
            self._check_images(resolved, message.images)
        plan = self.inference.plan(resolved, request.options, request.keep_alive)
        if not request.messages:
            yield await self.inference.load_or_unload(plan, "message", {"role": "assistant", "content": ""})
            return
        lease = await self.inference.scheduler.acquire(plan.ref, plan.keep_alive)
        try:
            messages = prompts.chat_messages(resolved.prompt_model(), list(request.messages))
            tools = list(request.tools) or None
            if gguf_template := self._gguf_template(resolved, lease):
                tagged, images = prompts.tag_images(messages)
                rendered = prompts.RenderedPrompt(
                    await self._render_gguf(gguf_template, tagged, lease, tools, request.truncate), images)
            else:
                if request.truncate:
                    messages = await self._fit(resolved.template, messages, lease, resolved, tools)
                rendered = prompts.render_chat(resolved.template, messages, tools=tools, think=think)
        except BaseException:
            lease.release()
            raise
        name = resolved.name
        if request.outputs.debug_render_only:
            lease.release()
            yield debug_render(name, "message", {"role": "", "content": ""}, rendered.text, len(rendered.images))
            return
        payload = {"prompt": rendered.text, "options": plan.sampling, "format": fmt,
                   "images": list(rendered.images), "add_bos": True, **request.outputs.payload()}
        parser = tool_parser_for(resolved.template, tools)
        # Log-probabilities wait for the next chunk that goes out (the tool-call parser may hold text back).
        logprobs: list[dict[str, Any]] = []

        def chunk(content: str, calls: list[tool_calls.ToolCall]) -> dict[str, Any]:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = [call.to_json() for call in calls]
            return {"model": name, "created_at": now_rfc3339(), "message": message, "done": False}

        first_token: float | None = None
        async for message in self.inference.run(lease, payload, request.caller):
            if message["type"] == "token":
                first_token = first_token or (time.perf_counter_ns() - started) / 1e9
                logprobs.extend(message.get("logprobs", ()))
                content, calls = parser.feed(message["text"]) if parser else (message["text"], [])
                if content or calls:
                    yield {**chunk(content, calls), **take_logprobs(logprobs)}
            elif message["type"] == "done":
                self.inference.scheduler.metrics.generation(name, message, first_token)
                if parser:
                    content, calls = parser.finish()
                    if content or calls:
                        yield {**chunk(content, calls), **take_logprobs(logprobs)}
                final = {**chunk("", []), **take_logprobs(logprobs)}
                final.update(done=True, done_reason=message["done_reason"])
                final.update(metrics(message, started, lease.load_duration_ns))
                yield final

    async def _fit(self, template: str, messages: list[prompts.ChatMessage], lease: Lease, resolved: Resolved,
                   tools: list[dict[str, Any]] | None) -> list[prompts.ChatMessage]:
        async def count(text: str) -> int:
            return await self.inference.count_tokens(lease, text)

        return await prompts.fit_messages_async(template, messages, num_ctx=lease.loaded.context_length,
                                                count_tokens=count, tools=tools,
                                                image_tokens=768 if resolved.projector_path else 0)

    @staticmethod
    def _gguf_template(resolved: Resolved, lease: Lease) -> str | None:
        """The GGUF's Jinja chat template, used only when the model has no TEMPLATE layer."""
        if resolved.view.template is not None:
            return None
        template = lease.runner.info.get("chat_template")
        return template if isinstance(template, str) and template.strip() else None

    async def _render_gguf(self, template: str, messages: list[prompts.ChatMessage], lease: Lease,
                           tools: list[dict[str, Any]] | None, truncate: bool) -> str:
        info = lease.runner.info
        tokens = {"bos_token": str(info.get("bos_token", "")), "eos_token": str(info.get("eos_token", ""))}
        if not truncate:
            return jinja_prompt.render(template, messages, tools=tools, **tokens)

        async def count(text: str) -> int:
            return await self.inference.count_tokens(lease, text)

        return await jinja_prompt.fit_and_render(template, messages, num_ctx=lease.loaded.context_length,
                                                 count_tokens=count, tools=tools, **tokens)

    @staticmethod
    def _check_images(resolved: Resolved, images: tuple[bytes, ...]) -> None:
        if images and resolved.projector_path is None:
            raise InvalidInput(
                f'"{resolved.name}" does not support images: it has no vision projector layer; '
                "use a multimodal model or remove the images"
            )
        check_images(images)
