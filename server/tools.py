"""Tool calling for Go-template models: what templates see, and what comes back out.

Two directions (docs/ollama-compatibility.md, "Tools" and "Templates"):

* In: the request's `tools` become the values a template expects (`tools_for_template`), so
  that `{{ .Tools }}`, `{{ json . }}` or `{{ .Function }}` print the JSON Ollama prints, in Go's
  field order. Tool calls of earlier assistant turns are `ToolCall`s (see server/prompt.py).
* Out: a model announces tool calls with a marker taken from its template
  (`tool_call_marker`); `ToolCallParser` splits streamed output into content and `ToolCall`s.

Public API: `ToolCall`, `new_tool_call_id`, `tool_call_marker`, `ToolCallParser`,
`capabilities_from_template`, `tools_for_template`.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any

from berth.registry import bounded_json
from berth.registry.errors import InvalidInput
from berth.server.template import (
    BranchNode,
    FieldNode,
    GoStruct,
    IfNode,
    JSONValue,
    ListNode,
    Node,
    TemplateError,
    TextNode,
    parse,
)

__all__ = [
    "ToolCall",
    "ToolCallParser",
    "capabilities_from_template",
    "new_tool_call_id",
    "tool_call_marker",
    "tools_for_template",
]

_ID_ALPHABET = string.ascii_lowercase + string.digits
_JSON_START_MARKERS = frozenset({"{", "["})  # markers meaning "the output itself is JSON"


def new_tool_call_id() -> str:
    """A fresh tool-call id as Ollama makes them: `call_` and 8 random [a-z0-9]."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


# ---------------------------------------------------------------------------------------------
# Tool calls


@dataclass(frozen=True)
class ToolCall:
    """One call of a tool: in an assistant message of the request, or parsed from output."""

    id: str
    name: str
    arguments: dict[str, Any]
    index: int = 0

    @classmethod
    def from_json(cls, data: Any, position: int = 0) -> ToolCall:
        """Decode a request message's `tool_calls` item:
        `{"id"?, "function": {"index"?, "name", "arguments": {...}}}`. `position` is the
        index used when the item has none. Raises InvalidInput for a wrong shape."""
        call = _expect_object(data, "tool call")
        function = _expect_object(call.get("function"), "tool call function")
        arguments = function.get("arguments")
        if arguments is None:
            arguments = {}
        arguments = _expect_object(arguments, "tool call arguments")
        index = function.get("index", position)
        if isinstance(index, bool) or not isinstance(index, int):
            raise InvalidInput(f"tool call index must be an integer, not {json.dumps(index)}")
        return cls(
            id=_expect_string(call.get("id"), "tool call id"),
            name=_expect_string(function.get("name"), "tool call name"),
            arguments=dict(arguments),
            index=index,
        )

    def to_json(self) -> dict[str, Any]:
        """The API form: `{"id", "function": {"index", "name", "arguments"}}` (no empty id)."""
        function = {"index": self.index, "name": self.name, "arguments": self.arguments}
        return {"id": self.id, "function": function} if self.id else {"function": function}

    def template_value(self) -> GoStruct:
        """The value templates see (Ollama's templateToolCall). Arguments print as their JSON,
        keys sorted, because Ollama hands templates a plain Go map with a JSON String()."""
        function = GoStruct(
            Index=self.index, Name=self.name, Arguments=JSONValue(dict(self.arguments)),
            type_name="template.templateToolCallFunction",
        )
        return GoStruct(ID=self.id, Function=function, type_name="template.templateToolCall")


def _expect_object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{what} must be a JSON object, not {json.dumps(value, default=str)}")
    return value


def _expect_string(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, not {json.dumps(value, default=str)}")
    return value


# ---------------------------------------------------------------------------------------------
# What a template says about tools


def _mentions_tool_calls(node: IfNode) -> bool:
    # Like Ollama, only a `.ToolCalls` field among the condition's arguments counts: not
    # `$.ToolCalls`, not inside a parenthesised sub-pipeline.
    return any(
        isinstance(arg, FieldNode) and "ToolCalls" in arg.ident
        for command in node.pipe.cmds
        for arg in command.args
    )


def _branch_lists(node: BranchNode) -> Iterator[ListNode]:
    yield node.list
    if node.else_list is not None:
        yield node.else_list


def _find_tool_calls_block(nodes: Sequence[Node]) -> IfNode | None:
    """The first `{{ if ... .ToolCalls ... }}` in document order, looking inside blocks
    (`else if` is an if nested in an else list)."""
    for node in nodes:
        if isinstance(node, IfNode) and _mentions_tool_calls(node):
            return node
        if isinstance(node, BranchNode):
            for body in _branch_lists(node):
                found = _find_tool_calls_block(body.nodes)
                if found is not None:
                    return found
        elif isinstance(node, ListNode):
            found = _find_tool_calls_block(node.nodes)
            if found is not None:
                return found
    return None


def _first_text(nodes: Sequence[Node]) -> str | None:
    """The first literal text in document order, descending into nested blocks."""
    for node in nodes:
        if isinstance(node, TextNode):
            return node.text
        children: Iterator[ListNode] | tuple[ListNode, ...] = ()
        if isinstance(node, BranchNode):
            children = _branch_lists(node)
        elif isinstance(node, ListNode):
            children = (node,)
        for child in children:
            found = _first_text(child.nodes)
            if found is not None:
                return found
    return None


def tool_call_marker(template_text: str) -> str | None:
    """The text a model writes before its tool calls (docs/ollama-compatibility.md, "Tools"), or None when the template
    has no `{{ if .ToolCalls }}` block (or does not parse).

    The marker is the first literal text inside that block, cut at the first `{` and trimmed:
    `<tool_call>` for Qwen, `[TOOL_CALLS]` for Mistral. When nothing is left the marker is `{`:
    the output itself must then start with JSON. One addition to Ollama's rule: a trailing
    ` [` that opens the JSON list (Mistral's `[TOOL_CALLS] [`) is left out, so the marker
    still matches output written without the space; the parser reads the list as JSON.
    """
    try:
        template = parse(template_text)
    except TemplateError:
        return None
    block = _find_tool_calls_block(template.root.nodes)
    if block is None:
        return None
    text = _first_text(block.list.nodes) or ""
    marker = text.replace("\r\n", "\n").split("{", 1)[0].strip()
    if len(marker) > 1 and marker.endswith("["):
        marker = marker[:-1].rstrip()
    return marker or "{"


def capabilities_from_template(template_text: str) -> set[str]:
    """Capabilities a template grants: "tools" (mentions Tools), "insert" (Suffix), "thinking"
    (Think or Thinking). Names compare case-insensitively, as Ollama lower-cases them. A
    template that does not parse grants nothing."""
    try:
        names = {name.lower() for name in parse(template_text).identifiers()}
    except TemplateError:
        return set()
    found = set()
    if "tools" in names:
        found.add("tools")
    if "suffix" in names:
        found.add("insert")
    if names & {"think", "thinking"}:
        found.add("thinking")
    return found


# ---------------------------------------------------------------------------------------------
# Request tools as template values
#
# Each Go type that templates print as JSON becomes a JSONValue pairing a view (Go field names,
# for `.Function.Name`) with a json form (json tags, in struct field order, omitempty honoured).
# Plain dicts stand for Go maps, whose JSON has sorted keys: the `properties` map Ollama hands
# templates, and any free-form schema (`items`, `$defs`, `enum` values).


@dataclass(frozen=True)
class _Property:
    """api.ToolProperty: the schema fields Ollama keeps; others are dropped as by Go's decoder."""

    any_of: tuple[_Property, ...]
    types: tuple[str, ...]
    items: Any
    description: str
    enum: tuple[Any, ...]
    properties: dict[str, _Property] | None  # ordered (Ollama's ToolPropertiesMap)

    @classmethod
    def decode(cls, data: Any, where: str) -> _Property:
        prop = _expect_object(data, where)
        any_of = prop.get("anyOf") or []
        if not isinstance(any_of, list):
            raise InvalidInput(f"{where}.anyOf must be an array")
        enum = prop.get("enum") or []
        if not isinstance(enum, list):
            raise InvalidInput(f"{where}.enum must be an array")
        return cls(
            any_of=tuple(cls.decode(option, f"{where}.anyOf") for option in any_of),
            types=_decode_types(prop.get("type"), where),
            items=prop.get("items"),
            description=_expect_string(prop.get("description"), f"{where}.description"),
            enum=tuple(enum),
            properties=_decode_properties(prop.get("properties"), where),
        )

    def json_form(self) -> GoStruct:
        form = GoStruct()
        if self.any_of:
            form["anyOf"] = [option.json_form() for option in self.any_of]
        if self.types:
            form["type"] = self.types[0] if len(self.types) == 1 else list(self.types)
        if self.items is not None:
            form["items"] = self.items
        if self.description:
            form["description"] = self.description
        if self.enum:
            form["enum"] = list(self.enum)
        if self.properties is not None:
            form["properties"] = GoStruct({name: prop.json_form() for name, prop in self.properties.items()})
        return form

    def view(self) -> GoStruct:
        # PropertyType prints through its String(): the bare name for one type, "[a b]" for
        # several, which is what a str and a list print here.
        type_view: str | list[str] = self.types[0] if len(self.types) == 1 else list(self.types)
        nested = None if self.properties is None else {name: prop.view() for name, prop in self.properties.items()}
        return GoStruct(
            AnyOf=[option.view() for option in self.any_of], Type=type_view or "", Items=self.items,
            Description=self.description, Enum=list(self.enum), Properties=nested,
            type_name="api.ToolProperty",
        )


def _or_empty(value: Any) -> Any:
    """An absent (or null) struct decodes to its zero value, as in Go."""
    return {} if value is None else value


def _decode_types(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise InvalidInput(f"{where}.type must be a string or an array of strings")


def _decode_properties(value: Any, where: str) -> dict[str, _Property] | None:
    if value is None:
        return None
    properties = _expect_object(value, f"{where}.properties")
    return {name: _Property.decode(prop, f"{where}.properties.{name}") for name, prop in properties.items()}


def _tool_value(data: Any, position: int) -> JSONValue:
    where = f"tools[{position}]"
    tool = _expect_object(data, where)
    function = _expect_object(_or_empty(tool.get("function")), f"{where}.function")
    parameters = _expect_object(_or_empty(function.get("parameters")), f"{where}.function.parameters")
    required = parameters.get("required") or []
    if not isinstance(required, list) or not all(isinstance(item, str) for item in required):
        raise InvalidInput(f"{where}.function.parameters.required must be an array of strings")
    properties = _decode_properties(parameters.get("properties"), f"{where}.function.parameters")

    properties_json = None if properties is None else {name: prop.json_form() for name, prop in properties.items()}
    properties_view = None if properties is None else {name: prop.view() for name, prop in properties.items()}
    parameters_json = GoStruct(type=_expect_string(parameters.get("type"), f"{where}.function.parameters.type"))
    for key in ("$defs", "items"):
        if parameters.get(key) is not None:
            parameters_json[key] = parameters[key]
    if required:
        parameters_json["required"] = list(required)
    parameters_json["properties"] = properties_json
    parameters_view = GoStruct(
        Type=parameters_json["type"], Defs=parameters.get("$defs"), Items=parameters.get("items"),
        Required=list(required), Properties=JSONValue(properties_view, properties_json),
        type_name="api.ToolFunctionParameters",
    )

    name = _expect_string(function.get("name"), f"{where}.function.name")
    description = _expect_string(function.get("description"), f"{where}.function.description")
    function_json = GoStruct(name=name)
    if description:
        function_json["description"] = description
    function_json["parameters"] = parameters_json
    function_view = GoStruct(
        Name=name, Description=description, Parameters=JSONValue(parameters_view, parameters_json),
        type_name="api.ToolFunction",
    )

    tool_json = GoStruct(type=_expect_string(tool.get("type"), f"{where}.type"))
    if tool.get("items") is not None:
        tool_json["items"] = tool["items"]
    tool_json["function"] = function_json
    tool_view = GoStruct(
        Type=tool_json["type"], Items=tool.get("items"), Function=JSONValue(function_view, function_json),
        type_name="template.templateTool",
    )
    return JSONValue(tool_view, tool_json)


def tools_for_template(tools_json: Sequence[Any] | None) -> JSONValue:
    """The request's `tools` as the `Tools` value of a template: a list that prints as its JSON,
    each tool printing as `{"type","items"?,"function":{"name","description"?,"parameters":
    {"type","$defs"?,"items"?,"required"?,"properties"}}}` with properties sorted by name, like
    Ollama. `.Function` and `.Function.Parameters` print as JSON too. Raises InvalidInput when a
    tool has the wrong shape."""
    tools = [_tool_value(tool, position) for position, tool in enumerate(tools_json or ())]
    return JSONValue(tools)


# ---------------------------------------------------------------------------------------------
# Parsing tool calls out of streamed output


class _State(Enum):
    LOOKING = auto()  # streaming content, watching for the marker
    FIRST_JSON = auto()  # marker `{`: waiting for the first non-space character of the output
    CALLS = auto()  # inside a tool-call section: JSON values, separators, closing tags
    DONE = auto()  # everything else is content


class _JSONSpan:
    """Finds where a JSON object or array that starts at offset 0 ends, resumably: text
    arrives in small pieces, and rescanning long arguments on each piece would be quadratic."""

    def __init__(self) -> None:
        self.scanned = 0
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def end(self, text: str) -> int | None:
        """The offset just past the value, or None while it is incomplete."""
        for offset in range(self.scanned, len(text)):
            char = text[offset]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.scanned = 0
                    return offset + 1
        self.scanned = len(text)
        return None


def _calls_in(value: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, arguments) of every object with a string `name` and an object `arguments` (or
    `parameters`), searching lists and nested objects as models wrap calls in various ways."""
    if isinstance(value, list):
        for item in value:
            yield from _calls_in(item)
        return
    if not isinstance(value, dict):
        return
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters"))
    if isinstance(arguments, str):
        # Some models write OpenAI-style arguments: a string holding the JSON object.
        try:
            arguments = bounded_json.decode(arguments)
        except ValueError:
            pass
    if isinstance(name, str) and name and isinstance(arguments, dict):
        yield name, arguments
        return
    for item in value.values():
        yield from _calls_in(item)


def _closing_tag(marker: str) -> str | None:
    """`</tool_call>` for `<tool_call>`, `[/TOOL_CALLS]` for `[TOOL_CALLS]`."""
    for opening, closing in (("<", "</"), ("[", "[/")):
        if marker.startswith(opening) and len(marker) > 2 and not marker.startswith(closing):
            return closing + marker[len(opening):]
    return None


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker`."""
    for length in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


class ToolCallParser:
    """Splits streamed model output into content and tool calls (docs/ollama-compatibility.md, "Tools").

    `feed(text)` returns the content that can be shown now and the calls completed so far;
    `finish()` returns what was held back. Content before the marker streams out, except a
    tail that could be the start of the marker. After the marker, JSON objects (one, a list,
    several, optionally separated by commas, repeated markers or the closing tag such as
    `</tool_call>`) with a `name` and an `arguments`/`parameters` object become ToolCalls.
    Text after the calls is content again (and may hold another marker). A JSON value that does
    not parse or holds no call is given back as content, marker included; so is an unfinished
    one at `finish()`. With the marker `{` (or `[`) only output that starts with JSON, after
    whitespace, is looked at.

    `closing` defaults to the marker's closing tag (`</x>` for `<x>`, `[/X]` for `[X]`);
    `new_id` makes call ids (injectable for tests).
    """

    def __init__(self, marker: str, closing: str | None = None, new_id: Callable[[], str] = new_tool_call_id) -> None:
        if not marker:
            raise ValueError("a tool-call marker cannot be empty")
        self.marker = marker
        self._json_start = marker in _JSON_START_MARKERS
        self.closing = closing if closing is not None or self._json_start else _closing_tag(marker)
        self._new_id = new_id
        self._state = _State.FIRST_JSON if self._json_start else _State.LOOKING
        self._buffer = ""  # text received and not yet decided on
        self._section = ""  # raw text of the current call section not yet turned into calls
        self._section_calls = 0  # calls found since the section's marker
        self._span = _JSONSpan()
        self._count = 0  # calls so far: the next call's index
        self._steps: dict[_State, Callable[[bool, list[str], list[ToolCall]], bool]] = {
            _State.LOOKING: self._look,
            _State.FIRST_JSON: self._first_json,
            _State.CALLS: self._read_calls,
            _State.DONE: self._pass_through,
        }

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Take the next piece of output; return (content to emit now, calls completed)."""
        self._buffer += text
        return self._advance(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The output has ended: return everything still held as content (and any last call)."""
        content, calls = self._advance(final=True)
        # Only an unfinished section is left: separators after calls are dropped, a marker
        # with no call after it and an unfinished JSON value are content.
        if self._section_calls == 0:
            content += self._section
        content += self._buffer
        self._section = self._buffer = ""
        self._state = _State.DONE
        return content, calls

    def _advance(self, final: bool) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        calls: list[ToolCall] = []
        # Each step consumes input or changes state, and returns False when it needs more text.
        while self._steps[self._state](final, content, calls):
            pass
        return "".join(content), calls

    def _pass_through(self, final: bool, content: list[str], calls: list[ToolCall]) -> bool:
        content.append(self._buffer)
        self._buffer = ""
        return False

    def _look(self, final: bool, content: list[str], calls: list[ToolCall]) -> bool:
        at = self._buffer.find(self.marker)
        if at < 0:
            keep = 0 if final else _held_prefix(self._buffer, self.marker)
            content.append(self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return False
        content.append(self._buffer[:at])
        self._section = self.marker
        self._section_calls = 0
        self._buffer = self._buffer[at + len(self.marker):]
        self._state = _State.CALLS
        return True

    def _first_json(self, final: bool, content: list[str], calls: list[ToolCall]) -> bool:
        stripped = self._buffer.lstrip()
        if not stripped:
            # Leading whitespace is content either way; emitting it keeps streaming prompt.
            content.append(self._buffer)
            self._buffer = ""
            return False
        content.append(self._buffer[: len(self._buffer) - len(stripped)])
        self._buffer = stripped
        self._section = ""
        self._section_calls = 0
        self._state = _State.CALLS if stripped[0] in "{[" else _State.DONE
        return True

    def _after_section(self) -> _State:
        # A `{` marker only applies at the very start of the output.
        return _State.DONE if self._json_start else _State.LOOKING

    def _read_calls(self, final: bool, content: list[str], calls: list[ToolCall]) -> bool:
        text = self._buffer
        stripped = text.lstrip(" \t\r\n,")
        if len(stripped) != len(text):
            self._section += text[: len(text) - len(stripped)]
            self._buffer = text = stripped
        if not text:
            return False
        if text[0] in "{[":
            return self._read_value(final, content, calls)
        separators = [tag for tag in (self.closing, None if self._json_start else self.marker) if tag]
        for tag in separators:
            if text.startswith(tag):
                self._buffer = text[len(tag):]
                if tag == self.marker:
                    # A repeated marker opens a new section: what a failure there gives back
                    # starts at it. The section before is dropped if it held calls (it is
                    # their separators) and is content if it did not.
                    if self._section_calls == 0:
                        content.append(self._section)
                    self._section, self._section_calls = tag, 0
                else:
                    self._section += tag
                return True
        if not final and any(tag.startswith(text) for tag in separators):
            return False  # maybe the start of a closing tag or another marker
        # Other text ends the section. Without a call in it, the marker was just text.
        if self._section_calls == 0:
            content.append(self._section)
        self._section = ""
        self._state = self._after_section()
        return True

    def _read_value(self, final: bool, content: list[str], calls: list[ToolCall]) -> bool:
        end = self._span.end(self._buffer)
        if end is None:
            return False  # finish() gives an unfinished value back as content
        raw, self._buffer = self._buffer[:end], self._buffer[end:]
        try:
            found = list(_calls_in(bounded_json.decode(raw)))
        except (ValueError, RecursionError):  # not JSON, or nested beyond what json parses
            found = []
        if not found:
            content.append(self._section + raw)
            self._section = ""
            self._state = self._after_section()
            return True
        for name, arguments in found:
            calls.append(ToolCall(id=self._new_id(), name=name, arguments=arguments, index=self._count))
            self._count += 1
        self._section = ""
        self._section_calls += len(found)
        return True
