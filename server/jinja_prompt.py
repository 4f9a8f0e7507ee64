"""Prompts for models without a TEMPLATE layer: the GGUF's own `tokenizer.chat_template` (Jinja).

The template comes from the model file, so it is untrusted: it runs in Jinja's immutable sandbox,
with only the values and helpers chat templates are written against, and within the `MAX_JINJA_*`
limits below. The sandbox stops a template from reaching Python's internals but not from spending
time and memory: a loop nested in a loop, a macro calling itself, a string doubled sixty times.
So every loop, call, filter and arithmetic operator the template runs draws from a per-render
Budget (its AST is rewritten at compile time to route loops and string building through it),
growth is checked before it happens where one call could be huge (`'a' * 10**10`, widths, joins),
the output is cut off at its limit, and a clock bounds whatever the counts miss. Every failure is
a PromptError (a 400), never a RecursionError, MemoryError or other exception reaching the server.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from functools import lru_cache, update_wrapper
from typing import Any, Awaitable, Sequence

from jinja2 import Template
from jinja2 import TemplateError as JinjaTemplateError
from jinja2 import nodes, pass_context
from jinja2.filters import (
    do_batch, do_center, do_format, do_indent, do_replace, make_attrgetter, sync_do_join, sync_do_slice,
)
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter, safe_range
from jinja2.visitor import NodeTransformer

from berth.server.prompt import ChatMessage, PromptError

MAX_JINJA_TEMPLATE_SIZE = 256 * 1024  # characters of template source; real chat templates are a few KB to ~30 KB
MAX_JINJA_STEPS = 200_000  # per render: loop iterations, range() items, calls, filters, operators and
#                            printed values, each ~1-10 us; a chat template spends ~10 per message
MAX_JINJA_CHARACTERS = 64 * 1024 * 1024  # per render: characters of strings built (and printed) on the way
MAX_JINJA_OUTPUT = 16 * 1024 * 1024  # characters of the rendered prompt
MAX_JINJA_INT_BITS = 65_536  # bits of an integer an operator may produce (2 ** 10 ** 10 would take hours)
MAX_JINJA_SECONDS = 5.0  # wall-clock time of one render: a backstop for work the counts above miss

_ITEMS_PER_STEP = 64  # list items an operator or call builds, at C speed, per step
_ITEMS_WALKED_PER_STEP = 16  # list items `_printed_size` looks at, in Python, per step
_BUDGET = "__render_budget"  # the render variable holding the Budget (templates can do nothing with it)


def _limit_error(problem: str, name: str, limit: float, advice: str) -> PromptError:
    return PromptError(f"the model's chat template {problem}; the limit is {limit} ({name}): {advice}", name)


# ---------------------------------------------------------------------------------------------
# The budget of one render


class _Budget:
    """What one render may still spend. Reached from the template's context by the hooks below;
    its attributes start with "_", which the sandbox hides from templates."""

    __slots__ = ("_steps", "_characters", "_deadline")

    def __init__(self) -> None:
        self._steps = MAX_JINJA_STEPS
        self._characters = MAX_JINJA_CHARACTERS
        self._deadline = time.monotonic() + MAX_JINJA_SECONDS

    def spend(self, steps: int, characters: int = 0) -> None:
        self._steps -= steps
        self._characters -= characters
        if self._steps < 0:
            raise _limit_error(f"ran for more than {MAX_JINJA_STEPS} steps", "MAX_JINJA_STEPS", MAX_JINJA_STEPS,
                               "loop less often, nest fewer loops, or stop a macro from calling itself")
        if self._characters < 0:
            raise _limit_error(f"built more than {MAX_JINJA_CHARACTERS} characters of text",
                               "MAX_JINJA_CHARACTERS", MAX_JINJA_CHARACTERS, "build shorter strings")
        if time.monotonic() > self._deadline:
            raise _limit_error(f"ran for more than {MAX_JINJA_SECONDS} seconds", "MAX_JINJA_SECONDS",
                               MAX_JINJA_SECONDS, "make it do less work")

    def spend_on(self, value: Any) -> Any:
        """Charge for a value just built (strings by character, lists by item) and pass it on."""
        if isinstance(value, str):
            self.spend(1, len(value))
        elif isinstance(value, (list, tuple, dict)):
            self.spend(1 + len(value) // _ITEMS_PER_STEP)
        else:
            self.spend(1)
        return value


def _budget(context: Context) -> _Budget:
    # The render's own variables (the context's parent), which `{% set %}` cannot replace.
    budget = context.parent.get(_BUDGET)
    if not isinstance(budget, _Budget):  # only if rendered without one: never from `render`
        raise PromptError("the model's chat template was rendered without a budget")
    return budget


def _integer_bits(value: Any) -> int:
    return value.bit_length() if isinstance(value, int) else 0


_CONTAINERS = (list, tuple, dict)


def _printed_size(value: Any, budget: _Budget) -> int:
    """About how many characters `value` prints as: its strings' lengths plus one per item,
    counting an item as often as it appears. `[[x] * 1000] * 1000` holds two small lists but
    prints a million x's: charging this when such a value is made, or before it is serialised,
    keeps what C code later builds from it (str, json, join) within the character budget. Each
    distinct list or dict is walked once, the walk paid for in steps."""
    sizes: dict[int, int] = {}
    pending: list[tuple[Any, bool]] = [(value, False)]
    while pending:
        item, children_done = pending.pop()
        if not isinstance(item, _CONTAINERS):
            continue
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        if children_done:
            sizes[id(item)] = sum(
                1 + (len(child) if isinstance(child, str) else sizes.get(id(child), 0)) for child in children
            )
        elif id(item) not in sizes:
            sizes[id(item)] = 0  # while walking: a value containing itself counts once
            budget.spend(1 + len(children) // _ITEMS_WALKED_PER_STEP)
            pending.append((item, True))
            pending.extend((child, False) for child in children if isinstance(child, _CONTAINERS))
    if isinstance(value, str):
        return len(value)
    return sizes.get(id(value), 1)


# Widths and precisions in printf-style (%) and format-spec ({:}) strings: each can pad to any size.
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _printf_size(template: str, values: Any) -> int:
    """An upper bound on what padding `template % values` may add: its widths and precisions,
    and every integer among the values where a `*` takes one from them."""
    size = 0
    starred = False
    for match in _PRINTF_SPEC.finditer(template):
        for number in match.groups():
            if number == "*":
                starred = True
            elif number:
                size += int(number)
    if starred:
        items = values if isinstance(values, tuple) else (values,)
        size += sum(abs(item) for item in items if isinstance(item, int))
    return size


def _check_growth(budget: _Budget, operator_name: str, left: Any, right: Any) -> None:
    """Charge, before it is built, what an operator would make: repetition and concatenation of
    strings and lists (at the size they print), big integers, and %-formatting's padding."""
    sequences = (str, list, tuple)
    if operator_name == "*":
        if isinstance(right, sequences):
            left, right = right, left
        if isinstance(left, sequences) and isinstance(right, int):
            _charge_sequence(budget, left, max(right, 0) * len(left), max(right, 0) * _printed_size(left, budget))
        elif isinstance(left, int) and isinstance(right, int):
            _check_bits(_integer_bits(left) + _integer_bits(right))
    elif operator_name == "+":
        if isinstance(left, sequences) and isinstance(right, sequences):
            _charge_sequence(budget, left, len(left) + len(right),
                             _printed_size(left, budget) + _printed_size(right, budget))
    elif operator_name == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            _check_bits(_integer_bits(left) * right)
    elif operator_name == "%" and isinstance(left, str):
        budget.spend(0, len(left) + _printf_size(left, right))


def _charge_sequence(budget: _Budget, like: Any, length: int, printed: int) -> None:
    """A string of `length` characters, or a list of `length` items that prints `printed` long."""
    budget.spend(0 if isinstance(like, str) else length // _ITEMS_PER_STEP, printed)


def _check_bits(bits: int) -> None:
    if bits > MAX_JINJA_INT_BITS:
        raise _limit_error(f"makes an integer of more than {MAX_JINJA_INT_BITS} bits", "MAX_JINJA_INT_BITS",
                           MAX_JINJA_INT_BITS, "use smaller numbers")


# String methods that can return far more than they are given, and what they would return.
_STRING_METHOD_SIZES: Mapping[str, Callable[..., int]] = {
    "center": lambda text, width=0, *rest: max(width, len(text)),
    "ljust": lambda text, width=0, *rest: max(width, len(text)),
    "rjust": lambda text, width=0, *rest: max(width, len(text)),
    "zfill": lambda text, width=0: max(width, len(text)),
    "expandtabs": lambda text, tabsize=8: len(text) + text.count("\t") * max(tabsize, 0),
    "replace": lambda text, old, new, count=-1: _replaced_size(text, old, new, count),
    "join": lambda text, items: sum(len(item) + len(text) for item in items if isinstance(item, str)),
    "translate": lambda text, table: len(text) * max(
        [len(value) for value in table.values() if isinstance(value, str)] + [1]
    ) if isinstance(table, Mapping) else len(text),
}


def _replaced_size(text: str, old: str, new: str, count: int | None = -1) -> int:
    if not (isinstance(old, str) and isinstance(new, str)):
        return len(text)
    found = len(text) + 1 if old == "" else text.count(old)
    if count is not None and count >= 0:
        found = min(found, count)
    return len(text) + found * max(len(new) - len(old), 0)


def _check_method_call(
    budget: _Budget, function: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[Any, ...]:
    """Charge what a string method would build, before it builds it; the arguments to call it
    with (an iterable to join is read into a list, to be read twice)."""
    owner = getattr(function, "__self__", None)
    size_of = _STRING_METHOD_SIZES.get(getattr(function, "__name__", ""))
    if isinstance(owner, str) and size_of is not None:
        if function.__name__ == "join" and len(args) == 1:
            args = (list(args[0]),)
        try:
            size = size_of(owner, *args, **kwargs)
        except TypeError:
            return args  # wrong arguments: the call itself will say so
        budget.spend(0, size)
    return args


# ---------------------------------------------------------------------------------------------
# The environment


class _BoundedFormatter(SandboxedFormatter):
    """str.format in the sandbox, refusing widths and precisions beyond the character budget."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        if any(int(number) > MAX_JINJA_CHARACTERS for number in _DIGITS.findall(format_spec)):
            raise _limit_error(f"formats a field wider than {MAX_JINJA_CHARACTERS} characters",
                               "MAX_JINJA_CHARACTERS", MAX_JINJA_CHARACTERS, "use smaller widths")
        return super().format_field(value, format_spec)


class _Bounding(NodeTransformer):
    """Rewrites a template's AST so that loops and the strings it builds pass through the budget:
    the iterable of each `for` through `_counted`, and each `~` concatenation, filter result and
    printed expression through `_built`. (Calls and operators reach `_BoundedEnvironment` anyway.)"""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = _wrap(node.iter, "_counted")
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        return _wrap(self.generic_visit(node), "_built")

    def visit_Filter(self, node: nodes.Filter) -> nodes.Node:
        node = self.generic_visit(node)
        # A {% filter %} block's filter has no operand; its output is counted when printed.
        return node if node.node is None else _wrap(node, "_built")

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        node = self.generic_visit(node)
        node.nodes = [item if isinstance(item, nodes.TemplateData) else _wrap(item, "_built") for item in node.nodes]
        return node


def _wrap(node: nodes.Expr, filter_name: str) -> nodes.Filter:
    return nodes.Filter(node, filter_name, [], [], None, None, lineno=node.lineno)


@pass_context
def _counted(context: Context, iterable: Any) -> Iterable[Any]:
    budget = _budget(context)
    for item in iterable:
        budget.spend(1)
        yield item


@pass_context
def _built(context: Context, value: Any) -> Any:
    return _budget(context).spend_on(value)


@pass_context
def _range(context: Context, *args: int) -> range:
    numbers = safe_range(*args)  # the sandbox's: at most MAX_RANGE items
    _budget(context).spend(len(numbers))
    return numbers


# Filters that can return far more than they are given, checked first (also when `map` calls them).

@pass_context
def _center(context: Context, value: Any, width: int = 80) -> str:
    _budget(context).spend(1, max(width, 0) + len(str(value)))
    return do_center(value, width)


@pass_context
def _indent(context: Context, text: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    lines = str(text)
    per_line = len(width) if isinstance(width, str) else max(int(width), 0)
    _budget(context).spend(1, len(lines) + (lines.count("\n") + 2) * per_line)
    return do_indent(text, width, first, blank)


@pass_context
def _format(context: Context, value: Any, *args: Any, **kwargs: Any) -> str:
    text = str(value)
    _budget(context).spend(1, len(text) + _printf_size(text, kwargs or args))
    return do_format(value, *args, **kwargs)


@pass_context
def _replace(context: Context, text: Any, old: Any, new: Any, count: int | None = None) -> str:
    _budget(context).spend(1, _replaced_size(str(text), str(old), str(new), count))
    return do_replace(context.eval_ctx, text, old, new, count)


@pass_context
def _join(context: Context, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> str:
    budget = _budget(context)
    if attribute is not None:
        value = map(make_attrgetter(context.environment, attribute), value)
    items = []
    separator = len(str(d))
    for item in value:  # counted as it goes: a list may repeat one long string many times
        budget.spend(0, _printed_size(item, budget) + separator)
        items.append(item)
    return sync_do_join(context.eval_ctx, items, d)


@pass_context
def _batch(context: Context, value: Iterable[Any], linecount: int, fill_with: Any = None) -> Iterable[list[Any]]:
    _budget(context).spend(1 + (max(int(linecount), 0) if fill_with is not None else 0))
    return do_batch(value, linecount, fill_with)


@pass_context
def _slice(context: Context, value: Iterable[Any], slices: int, fill_with: Any = None) -> Iterable[list[Any]]:
    _budget(context).spend(1 + max(int(slices), 0))
    return sync_do_slice(value, slices, fill_with)


@pass_context
def _tojson(context: Context, value: Any, indent: int | str | None = None) -> str:
    budget = _budget(context)
    if indent is None:  # json's C encoder, all at once: charge what it will write first
        budget.spend(0, 2 * _printed_size(value, budget))
        return json.dumps(value, ensure_ascii=False)
    # Indented JSON is written in Python anyway: piece by piece, each piece charged as it comes
    # (and each line's indentation, built before the budget sees it, first).
    budget.spend(0, len(indent) if isinstance(indent, str) else max(int(indent), 0))
    parts = []
    for part in json.JSONEncoder(ensure_ascii=False, indent=indent).iterencode(value):
        budget.spend(0, len(part))
        parts.append(part)
    return "".join(parts)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every call and arithmetic operator charged to the render's
    budget and checked for growth first, and the AST rewritten by `_Bounding`."""

    intercepted_binops = frozenset({"+", "*", "%", "**"})  # the ones that can build big values

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        del self.globals["lipsum"]  # lorem ipsum of any length; no chat template needs it
        self.globals.update(range=_range, raise_exception=_raise_exception,
                            strftime_now=lambda fmt: datetime.now().strftime(fmt))
        self.filters.update(_counted=_counted, _built=_built, center=_center, indent=_indent, format=_format,
                            replace=_replace, join=_join, batch=_batch, slice=_slice, tojson=_tojson)

    def _generate(self, source: nodes.Template, name: str | None, filename: str | None,
                  defer_init: bool = False) -> str:
        return super()._generate(_Bounding().visit(source), name, filename, defer_init)

    def call_binop(self, context: Context, operator_name: str, left: Any, right: Any) -> Any:
        budget = _budget(context)
        _check_growth(budget, operator_name, left, right)
        return budget.spend_on(self.binop_table[operator_name](left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _budget(__context)
        budget.spend(1)
        args = _check_method_call(budget, __obj, args, kwargs)
        return budget.spend_on(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """The sandbox's str.format and format_map, with `_BoundedFormatter`."""
        if super().wrap_str_format(value) is None:
            return None
        text: str = value.__self__
        formatter = _BoundedFormatter(self)

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if value.__name__ == "format_map":
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                args, kwargs = (), args[0]
            return type(text)(formatter.vformat(text, args, kwargs))

        return update_wrapper(wrapper, value)


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


# ---------------------------------------------------------------------------------------------
# Compiling and rendering


def _compile(source: str) -> Template:
    if len(source) > MAX_JINJA_TEMPLATE_SIZE:
        raise _limit_error(f"is {len(source)} characters long", "MAX_JINJA_TEMPLATE_SIZE",
                           MAX_JINJA_TEMPLATE_SIZE, "shorten it")
    compiled = _compile_cached(source)
    if isinstance(compiled, str):
        raise PromptError(compiled)
    return compiled


@lru_cache(maxsize=16)
def _compile_cached(source: str) -> Template | str:
    """The compiled template, or why it does not compile (cached too: compiling is slow)."""
    try:
        return _BoundedEnvironment().from_string(source)
    except JinjaTemplateError as exc:
        return f"the model's chat template does not parse: {exc}"
    except Exception as exc:  # RecursionError, MemoryError, SyntaxError ("too many statically nested blocks")
        return f"the model's chat template does not compile (does it nest too deeply?): {type(exc).__name__}: {exc}"


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
    Raises PromptError when the template does not parse, fails, or passes a limit.
    """
    template = _compile(source)
    chunks: list[str] = []
    length = 0
    try:
        for chunk in template.generate(
            messages=[_message_value(m) for m in messages], tools=list(tools) if tools else None,
            add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token, **{_BUDGET: _Budget()},
        ):
            length += len(chunk)
            if length > MAX_JINJA_OUTPUT:
                raise _limit_error(f"writes more than {MAX_JINJA_OUTPUT} characters", "MAX_JINJA_OUTPUT",
                                   MAX_JINJA_OUTPUT, "write a shorter prompt")
            chunks.append(chunk)
    except PromptError:
        raise
    except _TemplateRaised as exc:
        raise PromptError(str(exc)) from None
    except JinjaTemplateError as exc:
        raise PromptError(f"the model's chat template failed: {exc}") from None
    except RecursionError:
        raise PromptError("the model's chat template recursed too deeply (a macro that calls itself?)") from None
    except MemoryError:
        raise PromptError("the model's chat template ran out of memory") from None
    except Exception as exc:  # the template is untrusted code: whatever it raises is its failure
        raise PromptError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from None
    text = "".join(chunks)
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
