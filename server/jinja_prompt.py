"""Prompts for models without a TEMPLATE layer: the GGUF's own `tokenizer.chat_template` (Jinja).

The template comes from the model file, so it is untrusted: it runs in Jinja's immutable sandbox,
with only the values and helpers chat templates are written against.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Awaitable, Callable, Sequence

from jinja2 import TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.prompt import ChatMessage, PromptError


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except JinjaTemplateError as exc:
        raise PromptError(f"template error: the model's chat template does not parse: {exc}") from None


def _message_value(message: ChatMessage) -> dict[str, Any]:
    value: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        value["tool_calls"] = [{"type": "function", "id": call.id,
                                "function": {"name": call.name, "arguments": call.arguments}}
                               for call in message.tool_calls]
    if message.tool_name:
        value["name"] = message.tool_name
    if message.tool_call_id:
        value["tool_call_id"] = message.tool_call_id
    return value


def render(source: str, messages: Sequence[ChatMessage], *, tools: Sequence[Any] | None = None,
           bos_token: str = "", eos_token: str = "") -> str:
    """Render a conversation ending with the generation prompt for the assistant.

    A leading BOS written by the template is dropped: the runner adds BOS when it tokenizes.
    """
    template = _compile(source)
    try:
        text = template.render(messages=[_message_value(m) for m in messages], tools=list(tools) if tools else None,
                               add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)
    except _TemplateRaised as exc:
        raise PromptError(f"template error: {exc}") from None
    except JinjaTemplateError as exc:
        raise PromptError(f"template error: the model's chat template failed: {exc}") from None
    if bos_token and text.startswith(bos_token):
        text = text[len(bos_token):]
    return text


async def fit_and_render(source: str, messages: Sequence[ChatMessage], *, num_ctx: int,
                         count_tokens: Callable[[str], Awaitable[int]], tools: Sequence[Any] | None = None,
                         bos_token: str = "", eos_token: str = "") -> str:
    """Drop the oldest non-system messages until the prompt fits; system and last message stay."""
    kept = list(messages)
    while True:
        text = render(source, kept, tools=tools, bos_token=bos_token, eos_token=eos_token)
        droppable = [i for i, m in enumerate(kept[:-1]) if m.role != "system"]
        if not droppable or await count_tokens(text) <= num_ctx:
            return text
        del kept[droppable[0]]
