"""From a request to the prompt text a model sees: Ollama's chat templating
(docs/ollama-compatibility.md, "Templates").

Pure functions over immutable values; no I/O. The flow for a chat request:

    messages = chat_messages(model, request_messages)
    kept = fit_messages(model.template, messages, num_ctx=..., count_tokens=...)
    prompt = render_chat(model.template, kept, tools=..., think=...)

and for generate, `generate_messages` builds the message list, or
`render_suffix` renders fill-in-the-middle prompts. `check_template` vets a template
before a model or request uses it.

Templates are untrusted: each prompt renders within server.template's limits (one budget for
all the executions of a legacy template), and a template over one is a PromptError, a 400.

Public API: `IMAGE_TOKENS`, `ChatMessage`, `PromptModel`, `RenderedPrompt`, `PromptError`, `ThinkSetting`,
`chat_messages`, `check_template`, `generate_messages`, `render_chat`, `render_suffix`, `fit_messages`,
`fit_messages_async`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from berth.registry.errors import InvalidInput
from berth.server.template import Budget, GoStruct, JSONValue, Template, TemplateError, parse
from berth.server.tools import ToolCall, tools_for_template

__all__ = [
    "IMAGE_TOKENS",
    "ChatMessage",
    "PromptError",
    "PromptModel",
    "RenderedPrompt",
    "ThinkSetting",
    "chat_messages",
    "check_template",
    "fit_messages",
    "fit_messages_async",
    "generate_messages",
    "render_chat",
    "render_suffix",
    "tag_images",
]

IMAGE_TOKENS = 768  # what Ollama charges per image of a vision model when fitting num_ctx
_IMAGE_PLACEHOLDER = "[img]"

ThinkSetting = bool | str | None  # the request's `think`: unset, true/false, or a level name


class PromptError(InvalidInput):
    """The model's (or the request's) template failed to parse or to execute. `limit` names the
    limit it passed, if that is why (e.g. "MAX_TEMPLATE_STEPS")."""

    def __init__(self, error: TemplateError | str, limit: str | None = None) -> None:
        super().__init__(f"template error: {error}")
        self.limit = error.limit if isinstance(error, TemplateError) else limit


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation, as the templating needs it (images already decoded)."""

    role: str
    content: str = ""
    images: tuple[bytes, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_name: str | None = None
    tool_call_id: str | None = None
    thinking: str | None = None

    def template_value(self) -> GoStruct:
        """The value templates see for this message (Ollama's templateMessage)."""
        return GoStruct(
            Role=self.role, Content=self.content, Thinking=self.thinking or "",
            Images=list(self.images), ToolCalls=[call.template_value() for call in self.tool_calls],
            ToolName=self.tool_name or "", ToolCallID=self.tool_call_id or "",
            type_name="*template.templateMessage",
        )


@dataclass(frozen=True)
class PromptModel:
    """What of a model the prompt depends on."""

    template: str = "{{ .Prompt }}"  # the model's TEMPLATE, or Ollama's default
    system: str | None = None  # the model's SYSTEM
    messages: tuple[ChatMessage, ...] = ()  # the Modelfile's MESSAGE history
    has_projector: bool = False  # a vision model: images cost IMAGE_TOKENS each when fitting


@dataclass(frozen=True)
class RenderedPrompt:
    """A rendered prompt and the images its `[img-N]` tags refer to, N being the position."""

    text: str
    images: tuple[bytes, ...] = ()


# ---------------------------------------------------------------------------------------------
# Building the message list


def chat_messages(model: PromptModel, request_messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The conversation a chat request renders (docs/ollama-compatibility.md, "Templates"): the
    model's MESSAGE history, then
    the request's messages, with the model's SYSTEM in front when the first *request* message
    is not a system message. Like Ollama, a system message inside the history does not stop
    the model SYSTEM from being added; both reach the template."""
    messages = [*model.messages, *request_messages]
    if model.system and (not request_messages or request_messages[0].role != "system"):
        messages.insert(0, ChatMessage(role="system", content=model.system))
    return messages


def generate_messages(
    model: PromptModel, prompt: str, system: str | None = None, images: Sequence[bytes] = (),
    use_history: bool = True,
) -> list[ChatMessage]:
    """The conversation a generate request renders (docs/ollama-compatibility.md, "Templates"):
    the request's system, else the
    model's, if any; the MESSAGE history unless the request sent `context` (use_history=False);
    then the prompt as a user message carrying the images."""
    messages: list[ChatMessage] = []
    chosen_system = system or model.system
    if chosen_system:
        messages.append(ChatMessage(role="system", content=chosen_system))
    if use_history:
        messages.extend(model.messages)
    messages.append(ChatMessage(role="user", content=prompt, images=tuple(images)))
    return messages


# ---------------------------------------------------------------------------------------------
# Rendering


def _think_values(think: ThinkSetting) -> dict[str, Any]:
    """Think, ThinkLevel and IsThinkSet (docs/ollama-compatibility.md, "Templates"). A level
    counts as thinking; `true` is the
    level "medium"; the server resolves a model's default before calling."""
    if think is None:
        return {"Think": False, "ThinkLevel": "", "IsThinkSet": False}
    if isinstance(think, bool):
        return {"Think": think, "ThinkLevel": "medium" if think else "", "IsThinkSet": True}
    return {"Think": bool(think), "ThinkLevel": think, "IsThinkSet": True}


def _load(template_text: str) -> Template:
    """Parse, applying Ollama's rule: a template mentioning neither Messages nor
    Response (in any case) gets `{{ .Response }}` appended."""
    try:
        template = parse(template_text)
    except TemplateError as error:
        raise PromptError(error) from error
    names = {name.lower() for name in template.identifiers()}
    if "messages" not in names and "response" not in names:
        template = template.with_response_appended()
    return template


def _execute(template: Template, values: Mapping[str, Any], budget: Budget) -> str:
    try:
        return template.execute(values, budget)
    except TemplateError as error:
        raise PromptError(error) from error


def _collate(messages: Iterable[ChatMessage]) -> tuple[str, list[ChatMessage]]:
    """The joined system text, and the messages with runs of one role merged (contents joined
    by a blank line), except tool results, which stay one per call. As in Ollama only the
    content merges: the run keeps its first message's other fields."""
    systems: list[str] = []
    collated: list[ChatMessage] = []
    for message in messages:
        if message.role == "system":
            systems.append(message.content)
        if collated and collated[-1].role == message.role and message.role != "tool":
            collated[-1] = dataclasses.replace(collated[-1], content=collated[-1].content + "\n\n" + message.content)
        else:
            collated.append(message)
    return "\n\n".join(systems), collated


def tag_images(messages: Sequence[ChatMessage]) -> tuple[list[ChatMessage], tuple[bytes, ...]]:
    """As Ollama does it: each image gets the tag `[img-N]`, N counting across the messages. A tag
    replaces the first `[img]` placeholder left in the text, or else joins the tags prefixed
    to it, with no separator."""
    images: list[bytes] = []
    tagged: list[ChatMessage] = []
    for message in messages:
        prefix = ""
        content = message.content
        for image in message.images:
            tag = f"[img-{len(images)}]"
            if _IMAGE_PLACEHOLDER in content:
                content = content.replace(_IMAGE_PLACEHOLDER, tag, 1)
            else:
                prefix += tag
            images.append(image)
        tagged.append(dataclasses.replace(message, content=prefix + content) if message.images else message)
    return tagged, tuple(images)


@dataclass(frozen=True)
class _Renderer:
    """A template prepared once for rendering many message lists (truncation renders several)."""

    template: Template
    last_turn: Template  # legacy mode: the template cut after `.Response`
    messages_mode: bool
    tools: JSONValue
    think: Mapping[str, Any]

    @classmethod
    def prepare(cls, template_text: str, tools: Sequence[Any] | None, think: ThinkSetting) -> _Renderer:
        template = _load(template_text)
        names = {name.lower() for name in template.identifiers()}
        return cls(
            template, template.cut_after_response(), "messages" in names, tools_for_template(tools),
            _think_values(think),
        )

    def render(self, messages: Sequence[ChatMessage], budget: Budget | None = None) -> str:
        """One prompt, within `budget` (by default a full one of its own)."""
        budget = Budget() if budget is None else budget
        system, collated = _collate(messages)
        if self.messages_mode:
            return _execute(self.template, {
                "System": system, "Messages": [message.template_value() for message in collated],
                "Tools": self.tools, "Response": "", **self.think,
            }, budget)
        return self._render_legacy(collated, budget)

    def _render_legacy(self, collated: Sequence[ChatMessage], budget: Budget) -> str:
        """Legacy mode, as Ollama does it: one render per (system, prompt, response) turn, the last one cut right
        after `.Response` so the model writes there, with a final assistant text as prefill."""
        out: list[str] = []
        slots = {"System": "", "Prompt": "", "Response": ""}

        def flush() -> None:
            out.append(_execute(self.template, {**slots, **self.think}, budget))
            slots.update(System="", Prompt="", Response="")

        for message in collated:
            if message.role == "system":
                if slots["Prompt"] or slots["Response"]:
                    flush()
                slots["System"] = message.content
            elif message.role == "user":
                if slots["Response"]:
                    flush()
                slots["Prompt"] = message.content
            elif message.role == "assistant":
                slots["Response"] = message.content
        out.append(_execute(self.last_turn, {**slots, **self.think}, budget))
        return "".join(out)


def render_chat(
    template_text: str, messages: Sequence[ChatMessage], *, tools: Sequence[Any] | None = None,
    think: ThinkSetting = None,
) -> RenderedPrompt:
    """Render a conversation with a model template: Messages mode  when the template
    mentions `.Messages`, else legacy System/Prompt/Response mode , images tagged first
   . `tools` is the request's JSON list; `think` the request's setting. Raises
    PromptError for a template that does not parse or execute, InvalidInput for bad tools."""
    renderer = _Renderer.prepare(template_text, tools, think)
    tagged, images = tag_images(messages)
    return RenderedPrompt(renderer.render(tagged), images)


def render_suffix(template_text: str, prompt: str, suffix: str, *, think: ThinkSetting = None) -> str:
    """A fill-in-the-middle prompt : the template sees only Prompt, Suffix, Response ""
    and the think values. Ollama takes this path only when both are non-empty; otherwise the
    template is rendered as a conversation with no messages, as Ollama does."""
    if not (prompt and suffix):
        return render_chat(template_text, [], think=think).text
    return _render_infill(_load(template_text), prompt, suffix, think, Budget())


def _render_infill(template: Template, prompt: str, suffix: str, think: ThinkSetting, budget: Budget) -> str:
    return _execute(template, {"Prompt": prompt, "Suffix": suffix, "Response": "", **_think_values(think)}, budget)


# ---------------------------------------------------------------------------------------------
# Checking a template before use

_SAMPLE_CALL = ToolCall(id="call_0", name="get_weather", arguments={"city": "Paris", "unit": "celsius"})
_SAMPLE_MESSAGES = (
    ChatMessage("system", "You are a helpful assistant."),
    ChatMessage("user", "What is the weather in Paris?"),
    ChatMessage("assistant", "", tool_calls=(_SAMPLE_CALL,), thinking="The user wants the weather."),
    ChatMessage("tool", "22 degrees", tool_name="get_weather", tool_call_id="call_0"),
    ChatMessage("assistant", "It is 22 degrees in Paris.", thinking="Report it."),
    ChatMessage("user", "Thanks! And tomorrow?"),
)
_SAMPLE_TOOLS: tuple[Mapping[str, Any], ...] = ({
    "type": "function",
    "function": {
        "name": "get_weather", "description": "Get the weather in a city",
        "parameters": {
            "type": "object", "required": ["city"],
            "properties": {
                "city": {"type": "string", "description": "The city"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
        },
    },
},)
# (tools, think) pairs: a plain chat, thinking, and tools with a thinking level.
_SAMPLE_SETTINGS: tuple[tuple[Sequence[Any] | None, ThinkSetting], ...] = (
    (None, None), (None, True), (_SAMPLE_TOOLS, "high"),
)


def check_template(template_text: str) -> None:
    """Refuse a template a model could not render: one that does not parse, or that passes one
    of server.template's limits (size, nesting, template calls, steps, output) while rendering a
    small conversation (system, user, an assistant tool call with thinking, its result, a reply,
    a user turn) as a plain chat, with thinking, and with tools, and, when the template reads
    .Suffix, a fill-in-the-middle prompt. One budget covers all of these, so a hostile template
    costs no more to check than one prompt. Raises PromptError (an InvalidInput) naming the limit.

    Other execution errors pass, as Ollama checks only that a template parses: a template may
    fail on this sample and still work for the requests its model gets (chat reports those).
    """
    template = _load(template_text)
    budget = Budget()
    for tools, think in _SAMPLE_SETTINGS:
        renderer = _Renderer.prepare(template_text, tools, think)
        with _failing_only_over_a_limit():
            renderer.render(_SAMPLE_MESSAGES, budget)
    if "suffix" in {name.lower() for name in template.identifiers()}:
        with _failing_only_over_a_limit():
            _render_infill(template, "def add(a, b):", "    return c", None, budget)


@contextmanager
def _failing_only_over_a_limit() -> Iterator[None]:
    try:
        yield
    except PromptError as error:
        if error.limit is not None:
            raise


# ---------------------------------------------------------------------------------------------
# Truncation
#
# The search is written once as a generator that yields each candidate prompt and is sent back
# its token count; `fit_messages` and `fit_messages_async` only differ in how they count.

_Result = TypeVar("_Result")
_Counting = Generator[str, int, _Result]


def _candidate(messages: Sequence[ChatMessage], start: int) -> list[ChatMessage]:
    """The system messages before `start`, then everything from `start` on."""
    return [message for message in messages[:start] if message.role == "system"] + list(messages[start:])


def _fit_search(
    renderer: _Renderer, messages: Sequence[ChatMessage], num_ctx: int, image_tokens: int,
) -> _Counting[list[ChatMessage]]:
    """Find the first start index whose candidate fits num_ctx; the last message always stays.

    The whole conversation is tried first, as it usually fits. Otherwise the start is found by
    bisection: each later start drops one more non-system message, so the counts shrink, and
    the first fitting start is the one a linear scan finds, after log2(n) counts instead of n.
    (A legacy template can break that order: its System slot keeps only the last of several
    system messages between turns, so dropping a turn can merge them into a longer text. The
    start chosen then still fits, but may not be the first that does.) Images are counted as
    `image_tokens` each, without their text tags, as Ollama does; the rendered text has no tags
    either.
    """
    last = len(messages) - 1
    if last <= 0:
        return list(messages)

    def fits(start: int) -> Generator[str, int, bool]:
        tokens = yield renderer.render(_candidate(messages, start))
        tokens += image_tokens * sum(len(message.images) for message in messages[start:])
        return tokens <= num_ctx

    if (yield from fits(0)):
        return list(messages)
    low, high = 1, last  # `last` is the answer when nothing earlier fits
    while low < high:
        middle = (low + high) // 2
        if (yield from fits(middle)):
            high = middle
        else:
            low = middle + 1
    return _candidate(messages, low)


def _run_sync(search: _Counting[_Result], count_tokens: Callable[[str], int]) -> _Result:
    try:
        text = next(search)
        while True:
            text = search.send(count_tokens(text))
    except StopIteration as stop:
        return stop.value


async def _run_async(search: _Counting[_Result], count_tokens: Callable[[str], Awaitable[int]]) -> _Result:
    try:
        text = next(search)
        while True:
            text = search.send(await count_tokens(text))
    except StopIteration as stop:
        return stop.value


def fit_messages(
    template_text: str, messages: Sequence[ChatMessage], *, num_ctx: int, count_tokens: Callable[[str], int],
    tools: Sequence[Any] | None = None, think: ThinkSetting = None, image_tokens: int = IMAGE_TOKENS,
) -> list[ChatMessage]:
    """The messages to render so the prompt fits `num_ctx` tokens (docs/ollama-compatibility.md,
    "Templates"): the oldest non-system messages are dropped, system messages always stay, and so
    does the last message, even when it alone is too long. No room is kept for the answer.

    `count_tokens` tokenizes a rendered prompt. `image_tokens` is charged per image: pass 0
    for a model without a vision projector (see `PromptModel.has_projector`). Render the result
    with `render_chat` and the same tools and think setting.
    """
    renderer = _Renderer.prepare(template_text, tools, think)
    return _run_sync(_fit_search(renderer, messages, num_ctx, image_tokens), count_tokens)


async def fit_messages_async(
    template_text: str, messages: Sequence[ChatMessage], *, num_ctx: int,
    count_tokens: Callable[[str], Awaitable[int]], tools: Sequence[Any] | None = None,
    think: ThinkSetting = None, image_tokens: int = IMAGE_TOKENS,
) -> list[ChatMessage]:
    """`fit_messages` with an awaitable token counter (a runner's tokenize endpoint)."""
    renderer = _Renderer.prepare(template_text, tools, think)
    return await _run_async(_fit_search(renderer, messages, num_ctx, image_tokens), count_tokens)
