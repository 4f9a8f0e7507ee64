"""OpenAI's wire shapes translated to and from Berth's own requests and chunks
(docs/ollama-compatibility.md, "OpenAI compatibility").

Nothing here does I/O: requests are validated into pydantic models, turned into the same
`ChatInput` / `GenerateInput` the native API builds, and the native chunks that `Generation`
yields are turned back into OpenAI objects by a per-request translator. The routes in
`server/api/openai.py` only glue the two together.

Public API: `ChatCompletionRequest`, `CompletionRequest`, `EmbeddingRequest`, `chat_input`,
`generate_input`, `embedding_inputs`, `Translator`, `ChatTranslator`, `CompletionTranslator`, `embedding_list`,
`model_entry`, `error_body`, `decode_image_url`, `finish_reason`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import secrets
import struct
import time
from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from berth.registry import bounded_json
from berth.registry.errors import InvalidInput
from berth.registry.library import StoredModel
from berth.server.inference import ChatInput, GenerateInput, OutputOptions
from berth.server.prompt import ChatMessage
from berth.server.tools import ToolCall, new_tool_call_id

SYSTEM_FINGERPRINT = "fp_ollama"
DATA_URL_PREFIXES = ("data:;base64,",) + tuple(f"data:image/{kind};base64," for kind in ("jpeg", "jpg", "png", "webp"))
ENCODING_FORMATS = ("float", "base64")


# -- errors ----------------------------------------------------------------------------------------


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope; clients pick the exception class from the status and `type`, and
    `param` names the request field that was wrong."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# -- requests --------------------------------------------------------------------------------------


class _Lenient(BaseModel):
    # OpenAI clients send many fields we do not use (n, user, logit_bias, tool_choice...): ignore them.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamOptions(_Lenient):
    include_usage: bool = False


class FunctionCall(_Lenient):
    name: str = ""
    # OpenAI sends a JSON string; an object is taken too, as some clients send one.
    arguments: str | dict[str, Any] | None = None


class ToolCallIn(_Lenient):
    id: str | None = None
    type: str | None = None
    function: FunctionCall


class MessageIn(_Lenient):
    role: str
    content: str | list[Any] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None


class JsonSchemaFormat(_Lenient):
    name: str | None = None
    # `schema` would shadow a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")


class ResponseFormat(_Lenient):
    type: str = "text"
    json_schema: JsonSchemaFormat | None = None


class _Sampled(_Lenient):
    """Fields chat and text completions share."""

    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    def model_name(self) -> str:
        if not self.model:
            raise InvalidInput("model is required")
        return self.model

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def options(self) -> dict[str, Any]:
        """Native options. Temperature and top_p default to 1.0, OpenAI's defaults, not Ollama's."""
        options: dict[str, Any] = {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
        }
        if self.stop is not None:
            options["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        limit = self.token_limit()
        if limit is not None:
            options["num_predict"] = limit
        for key in ("seed", "frequency_penalty", "presence_penalty"):
            if getattr(self, key) is not None:
                options[key] = getattr(self, key)
        return options

    def token_limit(self) -> int | None:
        return self.max_tokens


class Reasoning(_Lenient):
    effort: str | None = None


# OpenAI's reasoning effort names, as Ollama maps them onto `think`.
EFFORT_TO_THINK: dict[str, bool | str] = {"none": False, "minimal": "low", "low": "low", "medium": "medium",
                                         "high": "high", "max": "max", "xhigh": "max", "ultra": "max"}


class ChatCompletionRequest(_Sampled):
    messages: list[MessageIn] | None = None
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    reasoning_effort: str | None = None
    reasoning: Reasoning | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def think(self) -> bool | str | None:
        effort = self.reasoning_effort or (self.reasoning.effort if self.reasoning else None)
        if effort is None:
            return None
        if effort not in EFFORT_TO_THINK:
            raise InvalidInput(f"invalid reasoning effort {effort!r}; use one of {', '.join(EFFORT_TO_THINK)}")
        return EFFORT_TO_THINK[effort]

    def token_limit(self) -> int | None:
        # max_completion_tokens replaced max_tokens in OpenAI's API; newer clients send only it.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def format(self) -> Any:
        if self.response_format is None:
            return None
        kind = self.response_format.type.strip().lower()
        if kind == "json_object":
            return "json"
        if kind == "json_schema" and self.response_format.json_schema is not None:
            return self.response_format.json_schema.json_schema
        return None


class CompletionRequest(_Sampled):
    prompt: Any = None
    suffix: str | None = None

    def options(self) -> dict[str, Any]:
        options = super().options()
        # Ollama's shim always sends both penalties (so a Modelfile's are overridden) and
        # treats top_p 0 as unset.
        options.setdefault("frequency_penalty", 0.0)
        options.setdefault("presence_penalty", 0.0)
        if not self.top_p:
            options["top_p"] = 1.0
        return options


class EmbeddingRequest(_Lenient):
    model: str | None = None
    input: Any = None
    dimensions: int | None = None
    encoding_format: str | None = None

    def model_name(self) -> str:
        if not self.model:
            raise InvalidInput("model is required")
        return self.model

    def encoding(self) -> str:
        value = (self.encoding_format or "float").lower()
        if value not in ENCODING_FORMATS:
            raise InvalidInput(f"Invalid value for 'encoding_format' = {self.encoding_format}. "
                               "Supported values: ['float', 'base64'].")
        return value


# -- request translation ---------------------------------------------------------------------------


def decode_image_url(url: str) -> bytes:
    """An `image_url` part's bytes: only base64 data URLs, as Ollama; fetching URLs is not done."""
    if url.startswith(("http://", "https://")):
        raise InvalidInput("image URLs are not currently supported, please use base64 encoded data instead")
    for prefix in DATA_URL_PREFIXES:
        if url.startswith(prefix):
            try:
                return base64.b64decode(url[len(prefix):], validate=True)
            except (binascii.Error, ValueError):
                break
    raise InvalidInput("invalid image input")


def _tool_arguments(value: str | dict[str, Any] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    try:
        parsed = bounded_json.decode(value)
    except ValueError:
        raise InvalidInput("invalid tool call arguments") from None
    if not isinstance(parsed, dict):
        raise InvalidInput("invalid tool call arguments")
    return parsed


def _part_message(role: str, part: Any) -> ChatMessage:
    """One content part becomes one native message of the same role (templates collate them)."""
    if not isinstance(part, dict):
        raise InvalidInput("invalid message format")
    kind = part.get("type")
    if kind == "text" and isinstance(part.get("text"), str):
        return ChatMessage(role=role, content=part["text"])
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if isinstance(url, str):
            return ChatMessage(role=role, images=(decode_image_url(url),))
    raise InvalidInput("invalid message format")


def chat_messages(messages: list[MessageIn]) -> tuple[ChatMessage, ...]:
    """OpenAI messages as native ones (docs/ollama-compatibility.md, "OpenAI compatibility")."""
    # A tool result without a name takes the name of the call it answers (the last call wins).
    names_by_call_id = {call.id: call.function.name for message in messages
                        for call in message.tool_calls or [] if call.id}
    out: list[ChatMessage] = []
    for position, message in enumerate(messages):
        role = message.role.lower()
        calls = tuple(ToolCall(id=call.id or "", name=call.function.name,
                               arguments=_tool_arguments(call.function.arguments), index=i)
                      for i, call in enumerate(message.tool_calls or []))
        tool_name = None
        if role == "tool":
            tool_name = message.name or names_by_call_id.get(message.tool_call_id or "")
        whole = ChatMessage(role=role, tool_calls=calls, tool_name=tool_name, tool_call_id=message.tool_call_id,
                            thinking=message.reasoning)
        if isinstance(message.content, str):
            out.append(dataclasses.replace(whole, content=message.content))
        elif isinstance(message.content, list):
            parts = [_part_message(role, part) for part in message.content]
            if parts:
                # Calls, names and reasoning belong to the message as a whole: they go with its last part.
                last = parts.pop()
                parts.append(dataclasses.replace(whole, content=last.content, images=last.images))
            elif calls:
                parts = [whole]
            out.extend(parts)
        elif calls:
            out.append(whole)  # OpenAI's assistant turns that only call tools have no content
        else:
            raise InvalidInput(f"invalid message content type: message {position} has no content")
    return tuple(out)


def chat_input(body: ChatCompletionRequest) -> ChatInput:
    model = body.model_name()
    if not body.messages:
        raise InvalidInput("[] is too short - 'messages'")
    return ChatInput(model=model, messages=chat_messages(body.messages), tools=tuple(body.tools or ()),
                     format=body.format(), options=body.options(), think=body.think(),
                     outputs=OutputOptions.parse(None, body.logprobs, body.top_logprobs, None))


def generate_input(body: CompletionRequest) -> GenerateInput:
    model = body.model_name()
    if body.prompt is not None and not isinstance(body.prompt, str):
        raise InvalidInput("prompt must be a string; lists of prompts and token ids are not supported")
    return GenerateInput(model=model, prompt=body.prompt or "", suffix=body.suffix or "", options=body.options())


def embedding_inputs(body: EmbeddingRequest) -> list[str]:
    """`input` as a list of strings: "" is one empty input; [] or non-strings are rejected."""
    value = body.input
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return list(value)
    raise InvalidInput("invalid input")


# -- responses -------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(done_reason: str | None, produced_tool_calls: bool) -> str:
    """OpenAI knows stop, length and tool_calls; Ollama's load/unload/cancel end nothing it models."""
    if done_reason == "length":
        return "length"
    return "tool_calls" if produced_tool_calls else "stop"


def openai_tool_call(native: dict[str, Any]) -> dict[str, Any]:
    """A native tool call (`ToolCall.to_json`) in OpenAI's form, arguments as a JSON string."""
    function = native.get("function", {})
    return {
        "id": native.get("id") or new_tool_call_id(),
        "index": function.get("index", 0),
        "type": "function",
        "function": {"name": function.get("name", ""),
                     "arguments": json.dumps(function.get("arguments", {}), ensure_ascii=False)},
    }


class Translator(ABC):
    """Per-request state shared by chat and text completions: id, timestamps, totals."""

    object_name = ""
    id_prefix = ""

    def __init__(self, include_usage: bool) -> None:
        # Ollama numbers responses below 999; the number only has to differ between requests.
        self.id = f"{self.id_prefix}-{secrets.randbelow(999)}"
        self.created = int(time.time())  # every chunk carries the first chunk's time
        self.include_usage = include_usage
        self.model = ""
        self.text: list[str] = []
        self.done_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def _observe(self, chunk: dict[str, Any]) -> None:
        self.model = chunk.get("model", self.model)
        if chunk.get("done"):
            self.done_reason = chunk.get("done_reason")
            self.prompt_tokens = int(chunk.get("prompt_eval_count", 0))
            self.completion_tokens = int(chunk.get("eval_count", 0))

    def _frame(self, object_name: str, **fields: Any) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT, **fields}

    def _usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.completion_tokens)

    @abstractmethod
    def events(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The stream events one native chunk becomes (possibly none)."""

    @abstractmethod
    def closing_events(self) -> list[dict[str, Any]]:
        """Events after the last native chunk, before `data: [DONE]`."""

    @abstractmethod
    def response(self) -> dict[str, Any]:
        """The whole answer, for `stream: false`, once every chunk went through `events`."""


class ChatTranslator(Translator):
    """Native chat chunks -> `chat.completion.chunk` events, or one `chat.completion`."""

    id_prefix = "chatcmpl"

    def __init__(self, include_usage: bool) -> None:
        super().__init__(include_usage)
        self.reasoning: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.logprobs: list[dict[str, Any]] = []  # every token's, for the whole answer
        self.unsent_logprobs: list[dict[str, Any]] = []  # those not yet attached to a streamed chunk
        self.role_sent = False

    def _chunk(self, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason}
        if self.unsent_logprobs:
            choice["logprobs"] = {"content": self.unsent_logprobs}
            self.unsent_logprobs = []
        return self._frame("chat.completion.chunk", choices=[choice])

    def _delta(self, fields: dict[str, Any]) -> dict[str, Any]:
        if not self.role_sent:
            self.role_sent = True
            fields = {"role": "assistant", **fields}
        return self._chunk(fields)

    def events(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        self._observe(chunk)
        message = chunk.get("message", {})
        thinking = message.get("thinking") or ""
        content = message.get("content", "")
        calls = [openai_tool_call(call) for call in message.get("tool_calls", [])]
        entries = [openai_logprob(entry) for entry in chunk.get("logprobs", ())]
        self.logprobs.extend(entries)
        self.unsent_logprobs.extend(entries)
        self.reasoning.append(thinking)
        self.text.append(content)
        self.tool_calls.extend(calls)
        events = []
        # Reasoning and content travel in separate chunks, as Ollama sends them.
        if thinking:
            events.append(self._delta({"reasoning": thinking}))
        # The native final chunk carries only statistics: it becomes the finish chunk instead.
        if content or calls:
            events.append(self._delta({"content": content, **({"tool_calls": calls} if calls else {})}))
        return events

    def closing_events(self) -> list[dict[str, Any]]:
        events = [] if self.role_sent else [self._delta({"content": ""})]
        events.append(self._chunk({}, finish_reason(self.done_reason, bool(self.tool_calls))))
        if self.include_usage:
            events.append(self._frame("chat.completion.chunk", choices=[], usage=self._usage()))
        return events

    def response(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text)}
        if any(self.reasoning):
            message["reasoning"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        choice: dict[str, Any] = {"index": 0, "message": message,
                                  "finish_reason": finish_reason(self.done_reason, bool(self.tool_calls))}
        if self.logprobs:
            choice["logprobs"] = {"content": self.logprobs}
        return self._frame("chat.completion", choices=[choice], usage=self._usage())


class CompletionTranslator(Translator):
    """Native generate chunks -> `text_completion` events (one per chunk), or one completion."""

    id_prefix = "cmpl"

    def _choice(self, text: str, reason: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "finish_reason": reason}

    def events(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        self._observe(chunk)
        text = chunk.get("response", "")
        self.text.append(text)
        reason = finish_reason(self.done_reason, False) if chunk.get("done") else None
        event = self._frame("text_completion", choices=[self._choice(text, reason)])
        if self.include_usage:
            # As Ollama: with include_usage every chunk has a (zero) usage; the totals come last.
            event["usage"] = usage(0, 0)
        return [event]

    def closing_events(self) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [self._frame("text_completion", choices=[], usage=self._usage())]

    def response(self) -> dict[str, Any]:
        choice = self._choice("".join(self.text), finish_reason(self.done_reason, False))
        return self._frame("text_completion", choices=[choice], usage=self._usage())


def openai_logprob(entry: dict[str, Any]) -> dict[str, Any]:
    """A native logprob entry in OpenAI's shape, where `top_logprobs` is always a list."""
    def one(item: dict[str, Any]) -> dict[str, Any]:
        return {"token": item.get("token", ""), "logprob": item.get("logprob", 0.0), "bytes": item.get("bytes", [])}

    return {**one(entry), "top_logprobs": [one(alt) for alt in entry.get("top_logprobs", ())]}


def _base64_floats(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embedding_list(model: str, vectors: list[list[float]], prompt_tokens: int, encoding: str) -> dict[str, Any]:
    """`/v1/embeddings` answer; base64 is little-endian float32, what OpenAI's client decodes."""
    data = [{"object": "embedding", "index": i,
             "embedding": _base64_floats(vector) if encoding == "base64" else vector}
            for i, vector in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def model_entry(stored: StoredModel) -> dict[str, Any]:
    """A `/v1/models` entry: `owned_by` is the namespace, `created` the modification time."""
    return {"id": stored.name.display, "object": "model", "created": int(stored.modified_at.timestamp()),
            "owned_by": stored.name.namespace}
