"""Go's `text/template`, as Ollama runs it for chat templates.

Model templates are Go templates (docs/ollama-compatibility.md, "Templates"): Ollama parses
them with `text/template`, option `missingkey=zero`, and four extra functions (`json`,
`currentDate`, `yesterdayDate`, `toTypeScriptType`). Prompts must come out byte for byte the
same, so this module reimplements the Go engine rather than translating templates to Jinja: a
lexer and a parser that follow `text/template/parse` (same tokens, same trimming, same error
messages), node dataclasses, and an executor that follows `text/template/exec.go` and the `fmt`
rules for printing values.

Values are plain Python data:

* `dict` (any Mapping) is a Go `map[string]any`: a missing key yields nil, which prints as
  "<no value>" (see `_Executor.field`); `range` visits keys in sorted order; `%v` prints
  `map[k:v ...]`; `json` sorts keys.
* `list`/`tuple` is a Go `[]any`; `str`, `int`, `float`, `bool` are Go's basic kinds, `None` is nil.
* `GoStruct` (a dict) and any other object, typically a dataclass, is a Go struct: reading a
  missing field is an error, as for Ollama's message structs; `json` keeps field order; methods of
  plain objects can be called.
* `JSONValue` wraps a value whose Go type has a `String()` method returning its JSON (Ollama's
  tool list and tool-call arguments): it prints as compact JSON and is otherwise transparent.

Templates are untrusted (API clients send them, model files carry them), so parsing and
executing are bounded by the `MAX_*` limits below, whatever the text and the values: no input
raises RecursionError or MemoryError or runs unbounded; each failure is a TemplateError, and one
from a limit names it (`TemplateError.limit`).

Public API: `render`, `parse`, `Template`, `Budget`, `TemplateError` (with `ParseError` /
`ExecError`), `JSONValue`, `GoStruct`, and the limits `MAX_TEMPLATE_SIZE`, `MAX_TEMPLATE_DEPTH`,
`MAX_TEMPLATE_CALL_DEPTH`, `MAX_TEMPLATE_STEPS`, `MAX_TEMPLATE_OUTPUT`, `MAX_VALUE_DEPTH`.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import functools
import inspect
import math
import urllib.parse
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum, auto
from types import MappingProxyType
from typing import Any, NoReturn

__all__ = [
    "MAX_TEMPLATE_CALL_DEPTH", "MAX_TEMPLATE_DEPTH", "MAX_TEMPLATE_OUTPUT", "MAX_TEMPLATE_SIZE",
    "MAX_TEMPLATE_STEPS", "MAX_VALUE_DEPTH", "Budget", "ExecError", "GoStruct", "JSONValue", "ParseError",
    "Template", "TemplateError", "parse", "render",
]


# ---------------------------------------------------------------------------------------------
# Limits
#
# Go bounds little (parentheses, {{template}} calls) and relies on its growable stacks; this
# engine recurses in Python and may run while a server waits. Each limit is far above what real
# chat templates need (a few KB, nesting under 10, thousands of steps per conversation).

MAX_TEMPLATE_SIZE = 256 * 1024  # bytes of template text (UTF-8)
MAX_TEMPLATE_DEPTH = 100  # nested if/range/with/block/define, else-if links and parentheses, and
#                           at execution the {{template}} calls on the way; bounds Python's stack
MAX_TEMPLATE_CALL_DEPTH = 50  # nested {{template}} calls (Go allows 100,000)
MAX_TEMPLATE_STEPS = 1_000_000  # per prompt, a step being ~1-5 us of work (see _Executor.spend);
#                                 a chat template spends about 100 per message
MAX_TEMPLATE_OUTPUT = 16 * 1024 * 1024  # characters per prompt, written or returned by functions
MAX_VALUE_DEPTH = 100  # nested lists, maps and structs in a value printed or marshalled

# What costs about one step besides a node, command, argument, field or loop iteration:
_ITEMS_PER_STEP = 64  # items or characters an argument or result holds (copied, compared, encoded)
_CHARACTERS_PER_STEP = 2  # characters formatted or escaped (item by item, character by character)


def _limit_message(problem: str, name: str, limit: int, advice: str) -> str:
    return f"{problem}; the limit is {limit} ({name}): {advice}"


# ---------------------------------------------------------------------------------------------
# Errors and value wrappers


class TemplateError(Exception):
    """A template failed to parse or to execute. The message is Go's wording, e.g.
    `template: :3: unexpected EOF` or `template: :1:3: executing "" at <.X.Y>: ...`, or, where
    a limit stopped it, says which: then `limit` is its name, e.g. "MAX_TEMPLATE_DEPTH"."""

    def __init__(self, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class ParseError(TemplateError):
    """The template text is not a valid Go template."""


class ExecError(TemplateError):
    """The template is valid but executing it against the given values failed."""


_UNSET: Any = object()  # "argument not given"; never mutated


class JSONValue:
    """A value that prints as its compact JSON, like Ollama's Go types with a JSON `String()`.

    `{{ .Tools }}` and `{{ .Function.Arguments }}` print JSON in Ollama because those Go types
    (templateTools, templateArgs, templateProperties) implement `fmt.Stringer`; `{{ .X.String }}`
    calls that method. Wrap such values in `JSONValue`.
    Templates still see through the wrapper for field access, `index`, `len`, `range` and truth.
    `json_form`, when given, is what gets marshalled instead of `value` (Go marshals structs by
    their json tags, which can differ from the field names a template uses). Only the wrapped
    value itself prints as JSON: elements reached through it are plain values unless wrapped too.
    """

    __slots__ = ("value", "json_form")

    def __init__(self, value: Any, json_form: Any = _UNSET) -> None:
        self.value = value
        self.json_form = json_form

    def marshal_form(self) -> Any:
        """The value `json` (and printing) marshals."""
        return self.value if self.json_form is _UNSET else self.json_form

    def json_text(self) -> str:
        """Compact Go-style JSON, or "" where Go's json.Marshal would fail (NaN, functions)."""
        try:
            return _go_json(self.marshal_form())
        except _JSONError:
            return ""

    def __repr__(self) -> str:
        return f"JSONValue({self.value!r})"


class GoStruct(dict[str, Any]):
    """A dict standing for a Go struct rather than a Go map.

    Fields keep their declaration (insertion) order when printed (`{a b}`, or `{Name:a ...}`
    with %+v) and when marshalled by `json`, where a plain dict, being a Go map, has its keys
    sorted. Reading a field that does not exist is an error ("can't evaluate field X in type T"),
    as for Ollama's message structs, and a struct is always true. Use it to build the JSON form of
    Ollama's tool structs, or as a lighter alternative to a dataclass.
    """

    __slots__ = ("type_name",)

    def __init__(self, fields: Mapping[str, Any] | None = None, /, *, type_name: str = "struct", **more: Any) -> None:
        super().__init__(fields or {}, **more)
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"GoStruct({dict.__repr__(self)}, type_name={self.type_name!r})"


def _unwrap(value: Any) -> Any:
    """The value a template operates on: JSONValue is transparent except when printed."""
    return value.value if isinstance(value, JSONValue) else value


def _check_value_depth(depth: int) -> None:
    """Printing and marshalling recurse per level of a value (a cyclic one has no bottom)."""
    if depth > MAX_VALUE_DEPTH:
        raise ExecError("template: " + _limit_message(
            f"a value nests more than {MAX_VALUE_DEPTH} levels deep, or contains itself", "MAX_VALUE_DEPTH",
            MAX_VALUE_DEPTH, "send flatter values",
        ), "MAX_VALUE_DEPTH")


# ---------------------------------------------------------------------------------------------
# Lexer (text/template/parse/lex.go)


class _T(Enum):
    ERROR = auto()
    BOOL = auto()
    CHAR = auto()  # printable ASCII character; grab bag for comma etc.
    CHAR_CONSTANT = auto()
    COMPLEX = auto()
    ASSIGN = auto()  # '='
    DECLARE = auto()  # ':='
    EOF = auto()
    FIELD = auto()
    IDENTIFIER = auto()
    LEFT_DELIM = auto()
    LEFT_PAREN = auto()
    NUMBER = auto()
    PIPE = auto()
    RAW_STRING = auto()
    RIGHT_DELIM = auto()
    RIGHT_PAREN = auto()
    SPACE = auto()
    STRING = auto()
    TEXT = auto()
    VARIABLE = auto()
    # keywords
    BLOCK = auto()
    BREAK = auto()
    CONTINUE = auto()
    DOT = auto()
    DEFINE = auto()
    ELSE = auto()
    END = auto()
    IF = auto()
    NIL = auto()
    RANGE = auto()
    TEMPLATE = auto()
    WITH = auto()


_KEYWORDS: Mapping[str, _T] = MappingProxyType({
    "block": _T.BLOCK, "break": _T.BREAK, "continue": _T.CONTINUE, "define": _T.DEFINE,
    "else": _T.ELSE, "end": _T.END, "if": _T.IF, "nil": _T.NIL, "range": _T.RANGE,
    "template": _T.TEMPLATE, "with": _T.WITH,
})
_KEYWORD_TYPES = frozenset(_KEYWORDS.values()) | {_T.DOT}
_SPACE_CHARS = " \t\r\n"  # what Go's trim markers and action spacing treat as space


@dataclass(frozen=True, slots=True)
class _Token:
    typ: _T
    val: str
    pos: int
    line: int

    def __str__(self) -> str:
        # Go's item.String(), used in "unexpected ..." messages.
        if self.typ is _T.EOF:
            return "EOF"
        if self.typ is _T.ERROR:
            return self.val
        if self.typ in _KEYWORD_TYPES:
            return f"<{self.val}>"
        if len(self.val.encode()) > 10:
            return _go_quote(self.val[:10]) + "..."
        return _go_quote(self.val)


def _is_alnum(char: str) -> bool:
    return char == "_" or char.isalpha() or char.isdecimal()


def _has_left_trim_marker(text: str, at: int) -> bool:
    return at + 1 < len(text) and text[at] == "-" and text[at + 1] in _SPACE_CHARS


def _has_right_trim_marker(text: str, at: int) -> bool:
    return at + 1 < len(text) and text[at] in _SPACE_CHARS and text[at + 1] == "-"


def _left_trim_length(text: str, at: int) -> int:
    end = at
    while end < len(text) and text[end] in _SPACE_CHARS:
        end += 1
    return end - at


class _Lexer:
    """Turns template text into tokens, eagerly, with Go's state machine.

    Trimming happens here, as in Go: `{{- ` drops the whitespace before it from the preceding
    text token and ` -}}` the whitespace after it. Comments produce no token. An error ends the
    stream with an ERROR token (its message) followed by EOF.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.start = 0
        self.paren_depth = 0
        self.tokens: list[_Token] = []
        self._newlines = [i for i, char in enumerate(text) if char == "\n"]

    def run(self) -> list[_Token]:
        state: Callable[[], Any] | None = self._lex_text
        while state is not None:
            state = state()
        return self.tokens

    def _line(self, pos: int) -> int:
        return bisect_left(self._newlines, pos) + 1

    def _emit(self, typ: _T) -> None:
        self.tokens.append(_Token(typ, self.text[self.start:self.pos], self.start, self._line(self.start)))
        self.start = self.pos

    def _error(self, message: str) -> None:
        self.tokens.append(_Token(_T.ERROR, message, self.start, self._line(self.start)))
        self.tokens.append(_Token(_T.EOF, "", len(self.text), self._line(len(self.text))))
        return None

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _accept(self, valid: str) -> bool:
        if self.pos < len(self.text) and self.text[self.pos] in valid:
            self.pos += 1
            return True
        return False

    def _accept_run(self, valid: str) -> None:
        while self._accept(valid):
            pass

    def _at_right_delim(self) -> tuple[bool, bool]:
        """(at a right delimiter, it carries a trim marker)."""
        if _has_right_trim_marker(self.text, self.pos) and self.text.startswith("}}", self.pos + 2):
            return True, True
        return self.text.startswith("}}", self.pos), False

    def _at_terminator(self) -> bool:
        char = self._peek()
        return char == "" or char in _SPACE_CHARS or char in ".,|:)(" or self.text.startswith("}}", self.pos)

    def _lex_text(self) -> Callable[[], Any] | None:
        found = self.text.find("{{", self.pos)
        if found >= 0:
            if found > self.start:
                trim = 0
                if _has_left_trim_marker(self.text, found + 2):
                    segment = self.text[self.start:found]
                    trim = len(segment) - len(segment.rstrip(_SPACE_CHARS))
                self.pos = found - trim
                if self.pos > self.start:
                    self._emit(_T.TEXT)
            self.pos = self.start = found
            return self._lex_left_delim
        self.pos = len(self.text)
        if self.pos > self.start:
            self._emit(_T.TEXT)
        self._emit(_T.EOF)
        return None

    def _lex_left_delim(self) -> Callable[[], Any] | None:
        self.pos += 2
        after_marker = 2 if _has_left_trim_marker(self.text, self.pos) else 0
        if self.text.startswith("/*", self.pos + after_marker):
            self.pos += after_marker
            self.start = self.pos
            return self._lex_comment
        self._emit(_T.LEFT_DELIM)
        self.pos += after_marker
        self.start = self.pos
        self.paren_depth = 0
        return self._lex_inside_action

    def _lex_comment(self) -> Callable[[], Any] | None:
        self.pos += 2
        end = self.text.find("*/", self.pos)
        if end < 0:
            return self._error("unclosed comment")
        self.pos = end + 2
        delim, trim = self._at_right_delim()
        if not delim:
            return self._error("comment ends before closing delimiter")
        self.pos += 4 if trim else 2
        if trim:
            self.pos += _left_trim_length(self.text, self.pos)
        self.start = self.pos
        return self._lex_text

    def _lex_right_delim(self) -> Callable[[], Any] | None:
        _, trim = self._at_right_delim()
        if trim:
            self.pos += 2
            self.start = self.pos
        self.pos += 2
        self._emit(_T.RIGHT_DELIM)
        if trim:
            self.pos += _left_trim_length(self.text, self.pos)
            self.start = self.pos
        return self._lex_text

    def _lex_inside_action(self) -> Callable[[], Any] | None:
        delim, _ = self._at_right_delim()
        if delim:
            if self.paren_depth == 0:
                return self._lex_right_delim
            return self._error("unclosed left paren")
        if self.pos >= len(self.text):
            return self._error("unclosed action")
        char = self.text[self.pos]
        self.pos += 1
        if char in _SPACE_CHARS:
            self.pos -= 1  # a space may begin " -}}"
            return self._lex_space
        if char == "=":
            self._emit(_T.ASSIGN)
        elif char == ":":
            if not self._accept("="):
                return self._error("expected :=")
            self._emit(_T.DECLARE)
        elif char == "|":
            self._emit(_T.PIPE)
        elif char == '"':
            return self._lex_quote
        elif char == "`":
            return self._lex_raw_quote
        elif char == "$":
            return self._lex_variable
        elif char == "'":
            return self._lex_char
        elif char == "." and self.pos < len(self.text) and not "0" <= self.text[self.pos] <= "9":
            return self._lex_field
        elif char in ".+-" or "0" <= char <= "9":
            self.pos -= 1
            return self._lex_number
        elif _is_alnum(char):
            self.pos -= 1
            return self._lex_identifier
        elif char == "(":
            self.paren_depth += 1
            self._emit(_T.LEFT_PAREN)
        elif char == ")":
            self.paren_depth -= 1
            if self.paren_depth < 0:
                return self._error("unexpected right paren")
            self._emit(_T.RIGHT_PAREN)
        elif ord(char) < 0x80 and char.isprintable():
            self._emit(_T.CHAR)
        else:
            return self._error(f"unrecognized character in action: {_go_sharp_u(char)}")
        return self._lex_inside_action

    def _lex_space(self) -> Callable[[], Any] | None:
        spaces = 0
        while self._peek() != "" and self._peek() in _SPACE_CHARS:
            self.pos += 1
            spaces += 1
        # The last space may belong to a trim-marked right delimiter " -}}".
        if _has_right_trim_marker(self.text, self.pos - 1) and self.text.startswith("}}", self.pos + 1):
            self.pos -= 1
            if spaces == 1:
                return self._lex_right_delim
        self._emit(_T.SPACE)
        return self._lex_inside_action

    def _lex_identifier(self) -> Callable[[], Any] | None:
        while self._peek() != "" and _is_alnum(self._peek()):
            self.pos += 1
        if not self._at_terminator():
            return self._error(f"bad character {_go_sharp_u(self._peek())}")
        word = self.text[self.start:self.pos]
        if word in _KEYWORDS:
            self._emit(_KEYWORDS[word])
        elif word in ("true", "false"):
            self._emit(_T.BOOL)
        else:
            self._emit(_T.IDENTIFIER)
        return self._lex_inside_action

    def _lex_field(self) -> Callable[[], Any] | None:
        return self._lex_field_or_variable(_T.FIELD)

    def _lex_variable(self) -> Callable[[], Any] | None:
        return self._lex_field_or_variable(_T.VARIABLE)

    def _lex_field_or_variable(self, typ: _T) -> Callable[[], Any] | None:
        if self._at_terminator():  # a bare "." or "$"
            self._emit(_T.DOT if typ is _T.FIELD else _T.VARIABLE)
            return self._lex_inside_action
        while self._peek() != "" and _is_alnum(self._peek()):
            self.pos += 1
        if not self._at_terminator():
            return self._error(f"bad character {_go_sharp_u(self._peek())}")
        self._emit(typ)
        return self._lex_inside_action

    def _lex_quoted(self, quote: str, typ: _T, message: str) -> Callable[[], Any] | None:
        while True:
            if self.pos >= len(self.text):
                return self._error(message)
            char = self.text[self.pos]
            self.pos += 1
            if char == "\\":
                if self.pos < len(self.text) and self.text[self.pos] != "\n":
                    self.pos += 1
                    continue
                return self._error(message)
            if char == "\n":
                return self._error(message)
            if char == quote:
                break
        self._emit(typ)
        return self._lex_inside_action

    def _lex_char(self) -> Callable[[], Any] | None:
        return self._lex_quoted("'", _T.CHAR_CONSTANT, "unterminated character constant")

    def _lex_quote(self) -> Callable[[], Any] | None:
        return self._lex_quoted('"', _T.STRING, "unterminated quoted string")

    def _lex_raw_quote(self) -> Callable[[], Any] | None:
        end = self.text.find("`", self.pos)
        if end < 0:
            return self._error("unterminated raw quoted string")
        self.pos = end + 1
        self._emit(_T.RAW_STRING)
        return self._lex_inside_action

    def _lex_number(self) -> Callable[[], Any] | None:
        if not self._scan_number():
            return self._error(f"bad number syntax: {_go_quote(self.text[self.start:self.pos])}")
        if self._peek() in ("+", "-"):
            # A complex constant such as 1+2i: no spaces, must end in 'i'.
            if not self._scan_number() or self.text[self.pos - 1] != "i":
                return self._error(f"bad number syntax: {_go_quote(self.text[self.start:self.pos])}")
            self._emit(_T.COMPLEX)
        else:
            self._emit(_T.NUMBER)
        return self._lex_inside_action

    def _scan_number(self) -> bool:
        self._accept("+-")
        digits = "0123456789_"
        if self._accept("0"):
            if self._accept("xX"):
                digits = "0123456789abcdefABCDEF_"
            elif self._accept("oO"):
                digits = "01234567_"
            elif self._accept("bB"):
                digits = "01_"
        self._accept_run(digits)
        if self._accept("."):
            self._accept_run(digits)
        if len(digits) == 11 and self._accept("eE"):
            self._accept("+-")
            self._accept_run("0123456789_")
        if len(digits) == 23 and self._accept("pP"):
            self._accept("+-")
            self._accept_run("0123456789_")
        self._accept("i")
        if self._peek() != "" and _is_alnum(self._peek()):
            self.pos += 1
            return False
        return True


# ---------------------------------------------------------------------------------------------
# Parse tree (text/template/parse/node.go). Nodes are immutable so parsed templates can be
# cached and shared; str() gives Go's String(), which execution errors quote as context.


@dataclass(frozen=True, slots=True)
class Node:
    pos: int  # offset of the node in the template text, for error locations


@dataclass(frozen=True, slots=True)
class TextNode(Node):
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class IdentifierNode(Node):
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class VariableNode(Node):
    ident: tuple[str, ...]  # ("$x", "Field", ...)

    def __str__(self) -> str:
        return ".".join(self.ident)


@dataclass(frozen=True, slots=True)
class FieldNode(Node):
    ident: tuple[str, ...]  # .A.B is ("A", "B")

    def __str__(self) -> str:
        return "".join("." + name for name in self.ident)


@dataclass(frozen=True, slots=True)
class ChainNode(Node):
    node: Node  # (pipeline).Field: the term before the fields
    fields: tuple[str, ...]

    def __str__(self) -> str:
        head = f"({self.node})" if isinstance(self.node, PipeNode) else str(self.node)
        return head + "".join("." + name for name in self.fields)


@dataclass(frozen=True, slots=True)
class DotNode(Node):
    def __str__(self) -> str:
        return "."


@dataclass(frozen=True, slots=True)
class NilNode(Node):
    def __str__(self) -> str:
        return "nil"


@dataclass(frozen=True, slots=True)
class BoolNode(Node):
    value: bool

    def __str__(self) -> str:
        return "true" if self.value else "false"


@dataclass(frozen=True, slots=True)
class NumberNode(Node):
    text: str
    value: int | float | complex  # the "ideal constant" Go picks from the syntax
    overflows_int: bool = False  # fits uint64 but not int: an error only when evaluated

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class StringNode(Node):
    quoted: str
    text: str

    def __str__(self) -> str:
        return self.quoted


@dataclass(frozen=True, slots=True)
class CommandNode(Node):
    args: tuple[Node, ...]

    def __str__(self) -> str:
        return " ".join(f"({arg})" if isinstance(arg, PipeNode) else str(arg) for arg in self.args)


@dataclass(frozen=True, slots=True)
class PipeNode(Node):
    line: int
    is_assign: bool
    decl: tuple[VariableNode, ...]
    cmds: tuple[CommandNode, ...]

    def __str__(self) -> str:
        head = ""
        if self.decl:
            head = ", ".join(map(str, self.decl)) + (" = " if self.is_assign else " := ")
        return head + " | ".join(map(str, self.cmds))


@dataclass(frozen=True, slots=True)
class ListNode(Node):
    nodes: tuple[Node, ...]

    def __str__(self) -> str:
        return "".join(map(str, self.nodes))


@dataclass(frozen=True, slots=True)
class ActionNode(Node):
    line: int
    pipe: PipeNode

    def __str__(self) -> str:
        return "{{" + str(self.pipe) + "}}"


@dataclass(frozen=True, slots=True)
class BranchNode(Node):
    line: int
    pipe: PipeNode
    list: ListNode
    else_list: ListNode | None

    keyword = ""

    def __str__(self) -> str:
        text = "{{" + self.keyword + " " + str(self.pipe) + "}}" + str(self.list)
        if self.else_list is not None:
            text += "{{else}}" + str(self.else_list)
        return text + "{{end}}"


@dataclass(frozen=True, slots=True)
class IfNode(BranchNode):
    keyword = "if"


@dataclass(frozen=True, slots=True)
class RangeNode(BranchNode):
    keyword = "range"


@dataclass(frozen=True, slots=True)
class WithNode(BranchNode):
    keyword = "with"


@dataclass(frozen=True, slots=True)
class BreakNode(Node):
    line: int

    def __str__(self) -> str:
        return "{{break}}"


@dataclass(frozen=True, slots=True)
class ContinueNode(Node):
    line: int

    def __str__(self) -> str:
        return "{{continue}}"


@dataclass(frozen=True, slots=True)
class TemplateNode(Node):
    line: int
    name: str
    pipe: PipeNode | None

    def __str__(self) -> str:
        if self.pipe is None:
            return "{{template " + _go_quote(self.name) + "}}"
        return "{{template " + _go_quote(self.name) + " " + str(self.pipe) + "}}"


@dataclass(frozen=True, slots=True)
class _EndNode(Node):  # parser-internal: terminates a list
    def __str__(self) -> str:
        return "{{end}}"


@dataclass(frozen=True, slots=True)
class _ElseNode(Node):  # parser-internal: terminates a list
    line: int

    def __str__(self) -> str:
        return "{{else}}"


# ---------------------------------------------------------------------------------------------
# Parser (text/template/parse/parse.go)

_OPERAND_START = frozenset({
    _T.BOOL, _T.CHAR_CONSTANT, _T.COMPLEX, _T.DOT, _T.FIELD, _T.IDENTIFIER, _T.NUMBER, _T.NIL,
    _T.RAW_STRING, _T.STRING, _T.VARIABLE, _T.LEFT_PAREN,
})
_MAX_PIPELINE_COMMANDS = 1000  # Go's limit


class _Variables:
    """The variables in scope while parsing: a stack, from which a control structure's {{end}}
    pops what it declared, and a count per name, so a lookup does not scan the stack."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.counts: Counter[str] = Counter()
        self.declare("$")

    def declare(self, name: str) -> None:
        self.stack.append(name)
        self.counts[name] += 1

    def mark(self) -> int:
        return len(self.stack)

    def pop_to(self, mark: int) -> None:
        self.counts.subtract(self.stack[mark:])
        del self.stack[mark:]

    def __contains__(self, name: str) -> bool:
        return self.counts[name] > 0


class _Parser:
    """Recursive descent over the token list, mirroring Go's parser function by function so
    that what is accepted, and every error message, matches."""

    def __init__(self, text: str, functions: frozenset[str]) -> None:
        self.tokens = _Lexer(text).run()
        self.index = 0
        self.furthest = 0  # Go reports the line of the last token read from the lexer
        self.functions = functions
        self.trees: dict[str, ListNode] = {}
        self.vars = _Variables()
        self.range_depth = 0
        self.depth = 0  # how deeply the parse recurses: see `nested`
        self.action_line = 0

    # token stream

    def next(self) -> _Token:
        at = min(self.index, len(self.tokens) - 1)
        self.furthest = max(self.furthest, at)
        self.index += 1
        return self.tokens[at]

    def backup(self) -> None:
        self.index -= 1

    def peek(self) -> _Token:
        token = self.next()
        self.backup()
        return token

    def next_non_space(self) -> _Token:
        token = self.next()
        while token.typ is _T.SPACE:
            token = self.next()
        return token

    def peek_non_space(self) -> _Token:
        token = self.next_non_space()
        self.backup()
        return token

    # errors

    def errorf(self, message: str, limit: str | None = None) -> NoReturn:
        line = self.tokens[min(self.furthest, len(self.tokens) - 1)].line
        raise ParseError(f"template: :{line}: {message}", limit)

    def unexpected(self, token: _Token, context: str) -> NoReturn:
        if token.typ is _T.ERROR:
            extra = ""
            if self.action_line != 0 and self.action_line != token.line:
                extra = f" in action started at :{self.action_line}"
                if token.val.endswith(" action"):
                    extra = extra[len(" in action"):]
            self.errorf(f"{token.val}{extra}")
        self.errorf(f"unexpected {token} in {context}")

    @contextmanager
    def nested(self) -> Iterator[None]:
        """One level deeper: a control structure, else-if, block, definition or parenthesis.
        The parser recurses a few frames for each, so bounding them bounds Python's stack."""
        if self.depth >= MAX_TEMPLATE_DEPTH:
            self.errorf(_limit_message(
                f"the template nests more than {MAX_TEMPLATE_DEPTH} levels deep", "MAX_TEMPLATE_DEPTH",
                MAX_TEMPLATE_DEPTH, "nest fewer if/range/with/block/else-if structures and parentheses",
            ), limit="MAX_TEMPLATE_DEPTH")
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def expect(self, expected: _T, context: str) -> _Token:
        token = self.next_non_space()
        if token.typ is not expected:
            self.unexpected(token, context)
        return token

    # trees

    def parse(self) -> dict[str, ListNode]:
        nodes: list[Node] = []
        root_pos = self.peek().pos
        while self.peek().typ is not _T.EOF:
            if self.peek().typ is _T.LEFT_DELIM:
                mark = self.index
                self.next()
                if self.next_non_space().typ is _T.DEFINE:
                    self.parse_definition()
                    continue
                self.index = mark
            node = self.text_or_action()
            if isinstance(node, (_EndNode, _ElseNode)):
                self.errorf(f"unexpected {node}")
            nodes.append(node)
        self.add_tree("", ListNode(root_pos, tuple(nodes)))
        return self.trees

    def add_tree(self, name: str, root: ListNode) -> None:
        existing = self.trees.get(name)
        if existing is None or _is_empty_tree(existing):
            self.trees[name] = root
        elif not _is_empty_tree(root):
            self.errorf(f"template: multiple definition of template {_go_quote(name)}")

    def _sub_tree(self) -> tuple[_Variables, int]:
        """Start a nested tree ({{define}} or {{block}} body): fresh variables, no range. (The
        nesting depth goes on: the parser still recurses.)"""
        saved = (self.vars, self.range_depth)
        self.vars, self.range_depth = _Variables(), 0
        return saved

    def parse_definition(self) -> None:
        context = "define clause"
        saved = self._sub_tree()
        token = self.next_non_space()
        if token.typ not in (_T.STRING, _T.RAW_STRING):
            self.unexpected(token, context)
        name = self.unquote(token)
        self.expect(_T.RIGHT_DELIM, context)
        with self.nested():
            body, end = self.item_list()
        if not isinstance(end, _EndNode):
            self.errorf(f"unexpected {end} in {context}")
        self.add_tree(name, body)
        self.vars, self.range_depth = saved

    def item_list(self) -> tuple[ListNode, Node]:
        pos = self.peek_non_space().pos
        nodes: list[Node] = []
        while self.peek_non_space().typ is not _T.EOF:
            node = self.text_or_action()
            if isinstance(node, (_EndNode, _ElseNode)):
                return ListNode(pos, tuple(nodes)), node
            nodes.append(node)
        self.errorf("unexpected EOF")

    def text_or_action(self) -> Node:
        token = self.next_non_space()
        if token.typ is _T.TEXT:
            return TextNode(token.pos, token.val)
        if token.typ is _T.LEFT_DELIM:
            self.action_line = token.line
            try:
                return self.action()
            finally:
                self.action_line = 0
        self.unexpected(token, "input")

    def action(self) -> Node:
        token = self.next_non_space()
        control = {
            _T.BLOCK: self.block_control, _T.ELSE: self.else_control, _T.END: self.end_control,
            _T.IF: self.if_control, _T.RANGE: self.range_control, _T.TEMPLATE: self.template_control,
            _T.WITH: self.with_control,
        }.get(token.typ)
        if control is not None:
            return control()
        if token.typ in (_T.BREAK, _T.CONTINUE):
            return self.loop_control(token)
        self.backup()
        token = self.peek()
        # Variables declared here persist until the enclosing {{end}}.
        return ActionNode(token.pos, token.line, self.pipeline("command", _T.RIGHT_DELIM))

    def loop_control(self, keyword: _Token) -> Node:
        name = "{{" + keyword.val + "}}"
        token = self.next_non_space()
        if token.typ is not _T.RIGHT_DELIM:
            self.unexpected(token, name)
        if self.range_depth == 0:
            self.errorf(f"{name} outside {{{{range}}}}")
        node_type = BreakNode if keyword.typ is _T.BREAK else ContinueNode
        return node_type(keyword.pos, keyword.line)

    def pipeline(self, context: str, end: _T) -> PipeNode:
        first = self.peek_non_space()
        decl: list[VariableNode] = []
        is_assign = False
        while True:  # Go's "decls:" label
            variable = self.peek_non_space()
            if variable.typ is not _T.VARIABLE:
                break
            mark = self.index
            self.next()
            following = self.peek_non_space()
            if following.typ in (_T.ASSIGN, _T.DECLARE):
                is_assign = following.typ is _T.ASSIGN
                self.next_non_space()
                decl.append(VariableNode(variable.pos, (variable.val,)))
                self.vars.declare(variable.val)
                break
            if following.typ is _T.CHAR and following.val == ",":
                self.next_non_space()
                decl.append(VariableNode(variable.pos, (variable.val,)))
                self.vars.declare(variable.val)
                if context == "range" and len(decl) < 2:
                    if self.peek_non_space().typ in (_T.VARIABLE, _T.RIGHT_DELIM, _T.RIGHT_PAREN):
                        continue  # second variable of "range $i, $e :="
                    self.errorf("range can only initialize variables")
                self.errorf(f"too many declarations in {context}")
            self.index = mark  # "$x foo": $x is an argument, not a declaration
            break
        cmds: list[CommandNode] = []
        while True:
            token = self.next_non_space()
            if token.typ is end:
                self.check_pipeline(cmds, context)
                return PipeNode(first.pos, first.line, is_assign, tuple(decl), tuple(cmds))
            if token.typ in _OPERAND_START:
                self.backup()
                cmds.append(self.command())
                if len(cmds) > _MAX_PIPELINE_COMMANDS:
                    self.errorf("pipeline too long")
            else:
                self.unexpected(token, context)

    def check_pipeline(self, cmds: list[CommandNode], context: str) -> None:
        if not cmds:
            self.errorf(f"missing value for {context}")
        for stage, cmd in enumerate(cmds[1:], start=2):
            if isinstance(cmd.args[0], (BoolNode, DotNode, NilNode, NumberNode, StringNode)):
                self.errorf(f"non executable command in pipeline stage {stage}")

    def if_control(self) -> Node:
        return IfNode(*self.parse_control("if"))

    def range_control(self) -> Node:
        return RangeNode(*self.parse_control("range"))

    def with_control(self) -> Node:
        return WithNode(*self.parse_control("with"))

    def parse_control(self, context: str) -> tuple[int, int, PipeNode, ListNode, ListNode | None]:
        mark = self.vars.mark()
        with self.nested():
            try:
                pipe = self.pipeline(context, _T.RIGHT_DELIM)
                if context == "range":
                    self.range_depth += 1
                body, following = self.item_list()
                if context == "range":
                    self.range_depth -= 1
                else_list: ListNode | None = None
                if isinstance(following, _ElseNode):
                    # "{{else if}}" and "{{else with}}" nest a new if/with that shares our {{end}}.
                    if context == "if" and self.peek().typ is _T.IF:
                        self.next()
                        else_list = ListNode(following.pos, (self.if_control(),))
                    elif context == "with" and self.peek().typ is _T.WITH:
                        self.next()
                        else_list = ListNode(following.pos, (self.with_control(),))
                    else:
                        else_list, following = self.item_list()
                        if not isinstance(following, _EndNode):
                            self.errorf(f"expected end; found {following}")
                return pipe.pos, pipe.line, pipe, body, else_list
            finally:
                self.vars.pop_to(mark)  # variables are scoped to the control structure

    def end_control(self) -> Node:
        return _EndNode(self.expect(_T.RIGHT_DELIM, "end").pos)

    def else_control(self) -> Node:
        following = self.peek_non_space()
        if following.typ in (_T.IF, _T.WITH):
            return _ElseNode(following.pos, following.line)
        token = self.expect(_T.RIGHT_DELIM, "else")
        return _ElseNode(token.pos, token.line)

    def template_name(self, token: _Token, context: str) -> str:
        if token.typ not in (_T.STRING, _T.RAW_STRING):
            self.unexpected(token, context)
        return self.unquote(token)

    def template_control(self) -> Node:
        context = "template clause"
        token = self.next_non_space()
        name = self.template_name(token, context)
        pipe: PipeNode | None = None
        if self.next_non_space().typ is not _T.RIGHT_DELIM:
            self.backup()
            pipe = self.pipeline(context, _T.RIGHT_DELIM)
        return TemplateNode(token.pos, token.line, name, pipe)

    def block_control(self) -> Node:
        context = "block clause"
        token = self.next_non_space()
        name = self.template_name(token, context)
        pipe = self.pipeline(context, _T.RIGHT_DELIM)
        saved = self._sub_tree()
        with self.nested():
            body, end = self.item_list()
        if not isinstance(end, _EndNode):
            self.errorf(f"unexpected {end} in {context}")
        self.add_tree(name, body)
        self.vars, self.range_depth = saved
        return TemplateNode(token.pos, token.line, name, pipe)

    def command(self) -> CommandNode:
        pos = self.peek_non_space().pos
        args: list[Node] = []
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                args.append(operand)
            token = self.next()
            if token.typ is _T.SPACE:
                continue
            if token.typ in (_T.RIGHT_DELIM, _T.RIGHT_PAREN):
                self.backup()
            elif token.typ is not _T.PIPE:
                self.unexpected(token, "operand")
            break
        if not args:
            self.errorf("empty command")
        return CommandNode(pos, tuple(args))

    def operand(self) -> Node | None:
        node = self.term()
        if node is None:
            return None
        if self.peek().typ is _T.FIELD:
            chain_pos = self.peek().pos
            fields: list[str] = []
            while self.peek().typ is _T.FIELD:
                fields.append(self.next().val[1:])
            # Like Go, fold fields onto a field or variable; other terms become a chain.
            if isinstance(node, FieldNode):
                node = FieldNode(chain_pos, node.ident + tuple(fields))
            elif isinstance(node, VariableNode):
                node = VariableNode(chain_pos, node.ident + tuple(fields))
            elif isinstance(node, (BoolNode, StringNode, NumberNode, NilNode, DotNode)):
                self.errorf(f"unexpected . after term {_go_quote(str(node))}")
            else:
                node = ChainNode(chain_pos, node, tuple(fields))
        return node

    def term(self) -> Node | None:
        token = self.next_non_space()
        typ = token.typ
        if typ is _T.IDENTIFIER:
            if token.val not in self.functions:
                self.errorf(f"function {_go_quote(token.val)} not defined")
            return IdentifierNode(token.pos, token.val)
        if typ is _T.DOT:
            return DotNode(token.pos)
        if typ is _T.NIL:
            return NilNode(token.pos)
        if typ is _T.VARIABLE:
            if token.val not in self.vars:
                self.errorf(f"undefined variable {_go_quote(token.val)}")
            return VariableNode(token.pos, (token.val,))
        if typ is _T.FIELD:
            return FieldNode(token.pos, tuple(token.val[1:].split(".")))
        if typ is _T.BOOL:
            return BoolNode(token.pos, token.val == "true")
        if typ in (_T.CHAR_CONSTANT, _T.COMPLEX, _T.NUMBER):
            return self.number(token)
        if typ is _T.LEFT_PAREN:
            with self.nested():
                return self.pipeline("parenthesized pipeline", _T.RIGHT_PAREN)
        if typ in (_T.STRING, _T.RAW_STRING):
            return StringNode(token.pos, token.val, self.unquote(token))
        self.backup()
        return None

    def unquote(self, token: _Token) -> str:
        if token.typ is _T.RAW_STRING:
            return token.val[1:-1].replace("\r", "")  # Go drops carriage returns in raw strings
        try:
            return _go_unquote(token.val[1:-1], '"')
        except ValueError:
            self.errorf("invalid syntax")

    def number(self, token: _Token) -> NumberNode:
        try:
            value, overflows = _parse_number(token.val, token.typ)
        except ValueError as error:
            self.errorf(str(error))
        return NumberNode(token.pos, token.val, value, overflows)


def _is_empty_tree(node: Node) -> bool:
    if isinstance(node, ListNode):
        return all(_is_empty_tree(child) for child in node.nodes)
    if isinstance(node, TextNode):
        return node.text.strip() == ""
    return False


# Numbers and strings, with Go's literal syntax (strconv.ParseInt/ParseFloat/Unquote).

_INT64 = 1 << 63


def _underscore_ok(text: str) -> bool:
    """Go's rule: underscores only between digits, or between a base prefix and a digit."""
    saw = "^"
    body = text[1:] if text[:1] in ("+", "-") else text
    index = 0
    hexadecimal = False
    if len(body) >= 2 and body[0] == "0" and body[1].lower() in "box":
        index, saw, hexadecimal = 2, "0", body[1].lower() == "x"
    for char in body[index:]:
        if "0" <= char <= "9" or (hexadecimal and char.lower() in "abcdef"):
            saw = "0"
        elif char == "_":
            if saw != "0":
                return False
            saw = "_"
        else:
            if saw == "_":
                return False
            saw = "!"
    return saw != "_"


def _parse_go_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, big): base prefixes, legacy octal, underscores."""
    sign, body = 1, text
    if body[:1] in ("+", "-"):
        sign, body = (-1 if body[0] == "-" else 1), body[1:]
    base = 10
    if len(body) >= 2 and body[0] == "0" and body[1] in "xXoObB":
        base, body = {"x": 16, "o": 8, "b": 2}[body[1].lower()], body[2:]
    elif len(body) >= 2 and body[0] == "0":
        base, body = 8, body[1:]
    digits = body.replace("_", "")
    if not digits or not _underscore_ok(text):
        return None
    try:
        return sign * int(digits, base)
    except ValueError:
        return None


def _parse_go_float(text: str) -> float | None:
    if not _underscore_ok(text):
        return None
    body = text.replace("_", "")
    unsigned = body.lstrip("+-")
    try:
        if unsigned[:2].lower() == "0x":
            if "p" not in unsigned.lower():  # Go requires the exponent in hex floats
                return None
            value = float.fromhex(body)
        elif not unsigned or unsigned[0] not in "0123456789.":
            return None
        else:
            value = float(body)
    except (ValueError, OverflowError):
        return None
    return None if math.isinf(value) else value  # Go: "value out of range"


def _parse_number(text: str, typ: _T) -> tuple[int | float | complex, bool]:
    """The value Go's idealConstant gives a number literal, and whether it only fits a uint."""
    if typ is _T.CHAR_CONSTANT:
        rune, end = _go_unquote_char(text, "'", 1)
        if text[end:] != "'":
            raise ValueError(f"malformed character constant: {text}")
        return (rune[0] if isinstance(rune, bytes) else rune), False
    if typ is _T.COMPLEX:
        parts = complex(text.replace("i", "j").replace("_", ""))
        return parts, False
    if text.endswith("i"):
        imaginary = _parse_go_float(text[:-1])
        if imaginary is not None:
            return complex(0, imaginary), False
    integer = _parse_go_int(text)
    if integer is not None and -_INT64 <= integer < _INT64:
        return integer, False
    if integer is not None and 0 <= integer < 2 * _INT64 and not text.startswith("+"):
        return integer, True
    number = _parse_go_float(text)
    if number is not None:
        if not any(c in text for c in ".eEpP"):
            raise ValueError(f"integer overflow: {_go_quote(text)}")
        return number, False
    raise ValueError(f"illegal number syntax: {_go_quote(text)}")


_SIMPLE_ESCAPES = MappingProxyType(
    {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
)
_QUOTE_ESCAPES = MappingProxyType({char: "\\" + letter for letter, char in _SIMPLE_ESCAPES.items() if letter != "\\"})


def _go_unquote_char(text: str, quote: str, start: int = 0) -> tuple[int | bytes, int]:
    """strconv.UnquoteChar on text[start:]: (rune, or a raw byte for \\x and octal escapes;
    where the rest of text begins). Positions, not slices, keep long literals linear."""
    if start >= len(text):
        raise ValueError("invalid syntax")
    char = text[start]
    if char == quote and quote in "'\"":
        raise ValueError("invalid syntax")
    if char != "\\":
        return ord(char), start + 1
    if start + 1 >= len(text):
        raise ValueError("invalid syntax")
    escape, rest = text[start + 1], start + 2
    if escape in _SIMPLE_ESCAPES:
        return ord(_SIMPLE_ESCAPES[escape]), rest
    if escape in ("'", '"'):
        if escape != quote:
            raise ValueError("invalid syntax")
        return ord(escape), rest
    if escape in "xuU":
        size = {"x": 2, "u": 4, "U": 8}[escape]
        digits = text[rest:rest + size]
        if len(digits) < size or any(c not in "0123456789abcdefABCDEF" for c in digits):
            raise ValueError("invalid syntax")
        value = int(digits, 16)
        if escape == "x":
            return bytes([value]), rest + size
        if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
            raise ValueError("invalid syntax")
        return value, rest + size
    if "0" <= escape <= "7":
        digits = text[start + 1:start + 4]
        if len(digits) < 3 or any(not "0" <= c <= "7" for c in digits):
            raise ValueError("invalid syntax")
        value = int(digits, 8)
        if value > 255:
            raise ValueError("invalid syntax")
        return bytes([value]), start + 4
    raise ValueError("invalid syntax")


def _go_unquote(body: str, quote: str) -> str:
    """The contents of a Go "..." literal; \\x and octal escapes are bytes, decoded as UTF-8."""
    out = bytearray()
    position = 0
    while position < len(body):
        if body[position] == "\n":
            raise ValueError("invalid syntax")
        value, position = _go_unquote_char(body, quote, position)
        out += value if isinstance(value, bytes) else chr(value).encode("utf-8", "surrogatepass")
    return out.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Go's fmt: how values print (%v in templates, print/printf/println, error messages)


@dataclass(frozen=True)
class _Flags:
    plus: bool = False
    minus: bool = False
    sharp: bool = False
    space: bool = False
    zero: bool = False
    plus_v: bool = False
    sharp_v: bool = False
    width: int | None = None
    prec: int | None = None


_NO_FLAGS = _Flags()


def _go_type_name(value: Any) -> str:
    value = _unwrap(value)
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, complex):
        return "complex128"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (bytes, bytearray)):
        return "[]uint8"
    if isinstance(value, (list, tuple)):
        return "[]interface {}"
    if isinstance(value, GoStruct):
        return value.type_name
    if isinstance(value, Mapping):
        return "map[string]interface {}"
    if inspect.isroutine(value):
        return "func()"
    return type(value).__name__


def _pad(text: str, flags: _Flags, zeros: bool | None = None) -> str:
    if flags.width is None or len(text) >= flags.width:
        return text
    fill = flags.width - len(text)
    if flags.minus:
        return text + " " * fill
    use_zeros = flags.zero if zeros is None else zeros
    return ("0" if use_zeros else " ") * fill + text


def _shortest_digits(value: float) -> tuple[str, int]:
    """Shortest round-trip decimal digits of a positive finite float and the decimal point
    position (value = 0.DIGITS x 10**point), as Go's strconv computes them."""
    sign_digits_exponent = decimal.Decimal(repr(value)).as_tuple()
    digits = list(sign_digits_exponent.digits)
    exponent = int(sign_digits_exponent.exponent)
    while len(digits) > 1 and digits[-1] == 0:
        digits.pop()
        exponent += 1
    while len(digits) > 1 and digits[0] == 0:
        digits.pop(0)
    text = "".join(map(str, digits))
    return text, len(text) + exponent


def _format_e(digits: str, point: int, precision: int, letter: str = "e") -> str:
    mantissa = digits[0]
    if precision > 0:
        mantissa += "." + (digits[1:] + "0" * precision)[:precision]
    exponent = point - 1 if digits != "0" else 0
    return f"{mantissa}{letter}{'-' if exponent < 0 else '+'}{abs(exponent):02d}"


def _format_f(digits: str, point: int, decimals: int) -> str:
    if point > 0:
        whole = digits[:point] + "0" * max(point - len(digits), 0)
    else:
        whole = "0"
    fraction = "".join(
        digits[point + i] if 0 <= point + i < len(digits) else "0" for i in range(decimals)
    )
    return whole + ("." + fraction if decimals > 0 else "")


def _shortest_g(magnitude: float, upper: bool = False) -> str:
    """strconv.FormatFloat(x, 'g', -1, 64) for x >= 0: %e when exponent < -4 or >= 6."""
    if magnitude == 0:
        return "0"
    digits, point = _shortest_digits(magnitude)
    exponent = point - 1
    if exponent < -4 or exponent >= 6:
        return _format_e(digits, point, len(digits) - 1, "E" if upper else "e")
    return _format_f(digits, point, max(len(digits) - point, 0))


def _go_quote(text: str, ascii_only: bool = False, quote: str = '"') -> str:
    """strconv.Quote (or QuoteToASCII / QuoteRune with quote="'")."""
    out = [quote]
    for char in text:
        code = ord(char)
        if char == quote or char == "\\":
            out.append("\\" + char)
        elif char.isprintable() and (not ascii_only or code < 0x80):
            out.append(char)
        elif char in "\a\b\f\n\r\t\v":
            out.append(_QUOTE_ESCAPES[char])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\\ufffd")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append(quote)
    return "".join(out)


def _go_sharp_u(char: str) -> str:
    """%#U: U+0041 'A'."""
    if char == "":
        return "U+FFFFFFFFFFFFFFFF"  # Go formats eof (-1) this way
    text = f"U+{ord(char):04X}"
    return f"{text} '{char}'" if char.isprintable() else text


_MAX_FORMAT_NUMBER = 1_000_000  # Go's fmt ignores larger widths and precisions (tooLarge)


def _parse_format_number(text: str, start: int) -> tuple[int | None, int]:
    """fmt's parsenum: the decimal number at `start`, or None, and where parsing stopped. A
    number that grows past a million gives None and stops at the end of the text, as in Go,
    so no width or precision can be huge."""
    number, position = None, start
    while position < len(text) and "0" <= text[position] <= "9":
        if number is not None and number > _MAX_FORMAT_NUMBER:
            return None, len(text)
        number = (number or 0) * 10 + ord(text[position]) - ord("0")
        position += 1
    return number, position


def _int_from_arg(args: list[Any], index: int) -> int | None:
    """fmt's intFromArg: a `*` width or precision, None when missing, not an int, or too large."""
    value = args[index] if index < len(args) else None
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > _MAX_FORMAT_NUMBER:
        return None
    return value


class _Printer:
    """Formats values the way Go's fmt package does for the verbs templates use."""

    def sprint(self, args: list[Any]) -> str:
        parts: list[str] = []
        previous_string = False
        for index, arg in enumerate(args):
            is_string = isinstance(arg, str)
            if index > 0 and not is_string and not previous_string:
                parts.append(" ")
            parts.append(self.arg(arg, "v", _NO_FLAGS))
            previous_string = is_string
        return "".join(parts)

    def sprintln(self, args: list[Any]) -> str:
        return " ".join(self.arg(arg, "v", _NO_FLAGS) for arg in args) + "\n"

    def sprintf(self, template: str, args: list[Any]) -> str:
        out: list[str] = []
        arg_index = 0
        i, end = 0, len(template)
        while i < end:
            percent = template.find("%", i)
            if percent < 0:
                out.append(template[i:])
                break
            out.append(template[i:percent])
            i = percent + 1
            spec: dict[str, Any] = {}  # the _Flags fields this verb sets
            while i < end and template[i] in "#0+- ":
                char = template[i]
                if char == "#":
                    spec["sharp"] = True
                elif char == "0":
                    spec["zero"] = not spec.get("minus")  # zero padding only to the left
                elif char == "+":
                    spec["plus"] = True
                elif char == "-":
                    spec["minus"], spec["zero"] = True, False
                else:
                    spec["space"] = True
                i += 1
            # width
            if i < end and template[i] == "*":
                i += 1
                width = _int_from_arg(args, arg_index)
                arg_index += 1
                if width is not None:
                    spec["width"] = abs(width)
                    if width < 0:
                        spec["minus"], spec["zero"] = True, False
                else:
                    out.append("%!(BADWIDTH)")
            else:
                width, i = _parse_format_number(template, i)
                if width is not None:
                    spec["width"] = width
            # precision
            if i < end and template[i] == ".":
                i += 1
                if i < end and template[i] == "*":
                    i += 1
                    precision = _int_from_arg(args, arg_index)
                    arg_index += 1
                    if precision is not None and precision >= 0:
                        spec["prec"] = precision
                    else:
                        out.append("%!(BADPREC)")
                else:
                    precision, i = _parse_format_number(template, i)
                    spec["prec"] = precision or 0
            if i >= end:
                out.append("%!(NOVERB)")
                break
            verb = template[i]
            i += 1
            if verb == "%":
                out.append("%")
                continue
            if arg_index >= len(args):
                out.append(f"%!{verb}(MISSING)")
                continue
            if verb == "v":
                # %#v and %+v are flagless formats of their own
                spec["sharp_v"], spec["sharp"] = spec.get("sharp", False), False
                spec["plus_v"], spec["plus"] = spec.get("plus", False), False
            flags = _Flags(**spec)
            out.append(self.arg(args[arg_index], verb, flags))
            arg_index += 1
        if arg_index < len(args):
            extras = [
                "<nil>" if arg is None else f"{_go_type_name(arg)}={self.arg(arg, 'v', _NO_FLAGS)}"
                for arg in args[arg_index:]
            ]
            out.append("%!(EXTRA " + ", ".join(extras) + ")")
        return "".join(out)

    def bad_verb(self, value: Any, verb: str) -> str:
        if value is None:
            return f"%!{verb}(<nil>)"
        return f"%!{verb}({_go_type_name(value)}={self.arg(value, 'v', _NO_FLAGS)})"

    def arg(self, value: Any, verb: str, flags: _Flags, depth: int = 0) -> str:
        _check_value_depth(depth)
        if value is None:
            if depth > 0:
                return "<nil>"
            return _pad("<nil>", flags) if verb in "vT" else self.bad_verb(value, verb)
        if verb == "T":
            return _pad(_go_type_name(value), flags)
        if isinstance(value, JSONValue):
            if verb in "vsxXq" and not flags.sharp_v:
                return self.string(value.json_text(), verb, flags)  # fmt.Stringer
            return self.arg(value.value, verb, flags, depth)
        if isinstance(value, bool):
            if verb in "tv":
                return _pad("true" if value else "false", flags)
            return self.bad_verb(value, verb)
        if isinstance(value, int):
            return self.integer(value, verb, flags)
        if isinstance(value, float):
            return self.float(value, verb, flags)
        if isinstance(value, complex):
            if verb not in "vgGeEfF":
                return self.bad_verb(value, verb)
            imaginary_flags = replace(flags, plus=True, width=None)
            real_flags = replace(flags, width=None)
            body = f"({self.float(value.real, verb, real_flags)}{self.float(value.imag, verb, imaginary_flags)}i)"
            return _pad(body, flags, zeros=False)
        if isinstance(value, str):
            return self.string(value, verb, flags)
        if isinstance(value, (bytes, bytearray)):
            if verb in "sqxX":
                return self.string(bytes(value).decode("utf-8", "replace"), verb, flags)
            value = list(value)
        if isinstance(value, (list, tuple)):
            items = " ".join(self.arg(item, verb, flags, depth + 1) for item in value)
            return f"[{items}]"
        if isinstance(value, GoStruct):
            parts = [
                (f"{name}:" if flags.plus_v or flags.sharp_v else "") + self.arg(item, verb, flags, depth + 1)
                for name, item in value.items()
            ]
            return "{" + " ".join(parts) + "}"
        if isinstance(value, Mapping):
            pairs = " ".join(
                f"{self.arg(key, verb, flags, depth + 1)}:{self.arg(value[key], verb, flags, depth + 1)}"
                for key in _sorted_keys(value)
            )
            return f"map[{pairs}]"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            parts = []
            for field in dataclasses.fields(value):
                text = self.arg(getattr(value, field.name), verb, flags, depth + 1)
                parts.append(f"{field.name}:{text}" if flags.plus_v or flags.sharp_v else text)
            return "{" + " ".join(parts) + "}"
        if inspect.isroutine(value):
            return self.bad_verb(value, verb) if verb != "v" else _pad(f"{value!r}", flags)
        return self.string(str(value), verb, flags)  # other objects print like Stringers

    def integer(self, value: int, verb: str, flags: _Flags) -> str:
        if verb == "c":
            return _pad(chr(value) if 0 <= value <= 0x10FFFF else "\ufffd", flags)
        if verb == "q":
            char = chr(value) if 0 <= value <= 0x10FFFF and not 0xD800 <= value <= 0xDFFF else "\ufffd"
            return _pad(_go_quote(char, ascii_only=flags.plus, quote="'"), flags)
        if verb == "U":
            digits = f"{value:X}".rjust(flags.prec or 4, "0")
            text = f"U+{digits}"
            if flags.sharp and 0 <= value <= 0x10FFFF and chr(value).isprintable():
                text += f" '{chr(value)}'"
            return _pad(text, flags, zeros=False)
        base = {"v": 10, "d": 10, "b": 2, "o": 8, "O": 8, "x": 16, "X": 16}.get(verb)
        if base is None:
            return self.bad_verb(value, verb)
        negative, magnitude = value < 0, abs(value)
        minimum_digits = 0
        if flags.prec is not None:
            minimum_digits = flags.prec
            if minimum_digits == 0 and magnitude == 0:
                return " " * (flags.width or 0)
        elif flags.zero and not flags.minus and flags.width is not None:
            minimum_digits = flags.width - (1 if negative or flags.plus or flags.space else 0)
        digits = format(magnitude, {2: "b", 8: "o", 10: "d", 16: "x"}[base])
        if verb == "X":
            digits = digits.upper()
        digits = digits.rjust(minimum_digits, "0")
        if flags.sharp:
            if base == 2:
                digits = "0b" + digits
            elif base == 8 and not digits.startswith("0"):
                digits = "0" + digits
            elif base == 16:
                digits = ("0X" if verb == "X" else "0x") + digits
        if verb == "O":
            digits = "0o" + digits
        sign = "-" if negative else "+" if flags.plus else " " if flags.space else ""
        return _pad(sign + digits, flags, zeros=False)

    def float(self, value: float, verb: str, flags: _Flags) -> str:
        if verb == "v":
            verb, default_precision = "g", -1
        elif verb in "gG":
            default_precision = -1
        elif verb in "eEfF":
            default_precision = 6
        else:
            return self.bad_verb(value, verb)
        precision = flags.prec if flags.prec is not None else default_precision
        if math.isnan(value) or math.isinf(value):
            if math.isnan(value):
                text = ("+" if flags.plus else " " if flags.space else "") + "NaN"
            else:
                text = "-Inf" if value < 0 else ("+Inf" if not flags.space or flags.plus else " Inf")
            return _pad(text, flags, zeros=False)
        magnitude = abs(value)
        if verb in "gG" and precision < 0:
            body = _shortest_g(magnitude, upper=verb == "G")
        else:
            body = format(magnitude, f".{precision}{'f' if verb == 'F' else verb}")
        negative = math.copysign(1.0, value) < 0
        sign = "-" if negative else "+" if flags.plus else " " if flags.space else ""
        if flags.zero and not flags.minus and flags.width is not None and flags.width > len(sign + body):
            return sign + "0" * (flags.width - len(sign) - len(body)) + body
        return _pad(sign + body, flags, zeros=False)

    def string(self, value: str, verb: str, flags: _Flags) -> str:
        if verb in "vs":
            if flags.sharp_v:
                return _pad(_go_quote(value), flags)
            return _pad(value if flags.prec is None else value[:flags.prec], flags)
        if verb == "q":
            text = value if flags.prec is None else value[:flags.prec]
            if flags.sharp and "`" not in text and all(c == "\t" or c.isprintable() for c in text):
                return _pad("`" + text + "`", flags)
            return _pad(_go_quote(text, ascii_only=flags.plus), flags)
        if verb in "xX":
            data = value.encode("utf-8")
            if flags.prec is not None:
                data = data[:flags.prec]
            digits = "0123456789ABCDEF" if verb == "X" else "0123456789abcdef"
            prefix = "0X" if verb == "X" else "0x"
            parts = []
            for index, byte in enumerate(data):
                part = digits[byte >> 4] + digits[byte & 0xF]
                if flags.sharp and (flags.space or index == 0):
                    part = prefix + part
                parts.append(part)
            return _pad((" " if flags.space else "").join(parts), flags)
        return self.bad_verb(value, verb)


_PRINTER = _Printer()  # stateless


def _sorted_keys(mapping: Mapping[Any, Any]) -> list[Any]:
    """Map keys in Go's fmtsort order (numbers numerically, strings bytewise)."""

    def order(key: Any) -> tuple[int, Any]:
        if key is None:
            return (0, 0)
        if isinstance(key, bool):
            return (1, key)
        if isinstance(key, (int, float)):
            return (2, key)
        if isinstance(key, str):
            return (3, key)
        return (4, repr(key))

    return sorted(mapping.keys(), key=order)


def _print_value(value: Any) -> str:
    """What `{{ pipeline }}` writes: Go's fmt.Fprint, with an invalid value as "<no value>"."""
    if value is None:
        return "<no value>"
    if isinstance(value, str):
        return value
    return _PRINTER.arg(value, "v", _NO_FLAGS)


# ---------------------------------------------------------------------------------------------
# Go's encoding/json (for the `json` function and JSONValue)


class _JSONError(Exception):
    pass


def _json_float(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        raise _JSONError(f"json: unsupported value: {value}")
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    magnitude = abs(value)
    digits, point = _shortest_digits(magnitude)
    sign = "-" if value < 0 else ""
    if magnitude < 1e-6 or magnitude >= 1e21:
        text = _format_e(digits, point, len(digits) - 1)
        if len(text) >= 4 and text[-4] == "e" and text[-3] == "-" and text[-2] == "0":
            text = text[:-2] + text[-1]  # e-07 becomes e-7, as Go does
        return sign + text
    return sign + _format_f(digits, point, max(len(digits) - point, 0))


_JSON_ESCAPES = MappingProxyType({
    '"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
    "<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029",
})


# One table for str.translate, which escapes at C speed: Go's escapes, \u00XX for the other
# control characters, and U+FFFD for lone surrogates (Go replaces invalid UTF-8).
_JSON_TRANSLATION = MappingProxyType({
    **{code: f"\\u{code:04x}" for code in range(0x20)},
    **{code: "\\ufffd" for code in range(0xD800, 0xE000)},
    **{ord(char): escaped for char, escaped in _JSON_ESCAPES.items()},
})


def _json_string(text: str) -> str:
    return '"' + text.translate(_JSON_TRANSLATION) + '"'


def _go_json(value: Any, depth: int = 0) -> str:
    """json.Marshal: compact, HTML-safe, map keys sorted, structs in field order."""
    _check_value_depth(depth)
    inner = depth + 1
    if isinstance(value, JSONValue):
        return _go_json(value.marshal_form(), inner)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, (bytes, bytearray)):
        return _json_string(base64.b64encode(bytes(value)).decode("ascii"))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_go_json(item, inner) for item in value) + "]"
    if isinstance(value, GoStruct):
        return "{" + ",".join(_json_string(str(key)) + ":" + _go_json(item, inner) for key, item in value.items()) + "}"
    if isinstance(value, Mapping):
        keys = sorted(value.keys(), key=str)
        return "{" + ",".join(_json_string(str(key)) + ":" + _go_json(value[key], inner) for key in keys) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        members = (
            _json_string(field.name) + ":" + _go_json(getattr(value, field.name), inner)
            for field in dataclasses.fields(value)
        )
        return "{" + ",".join(members) + "}"
    raise _JSONError(f"json: unsupported type: {_go_type_name(value)}")


# ---------------------------------------------------------------------------------------------
# Built-in functions (text/template/funcs.go) and Ollama's additions (template/template.go)


class _CallError(Exception):
    """A function failed; the executor reports it as `error calling NAME: message`."""


_ANY = "any"  # parameter kinds: Go `any`/reflect.Value, or `string`
_STRING = "string"


@dataclass(frozen=True, slots=True)
class _Function:
    impl: Callable[..., Any]
    fixed: tuple[str, ...]  # kinds of the fixed parameters
    variadic: str | None = None  # kind of the ... parameter, if any


def _is_true(value: Any) -> bool:
    """Go's truth: false, 0, nil and empty strings/lists/maps are false; structs are true."""
    value = _unwrap(value)
    if value is None:
        return False
    if isinstance(value, GoStruct):
        return True
    if isinstance(value, (bool, int, float, complex)):
        return value != 0
    if isinstance(value, (str, bytes, bytearray, list, tuple, Mapping)):
        return len(value) > 0
    return True


def _basic_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, complex):
        return "complex"
    if isinstance(value, str):
        return "string"
    return "invalid"  # nil and every non-basic kind


def _reflect_kind(value: Any) -> str:
    """The reflect.Kind family Go's eq compares for non-basic values."""
    if value is None:
        return "invalid"
    if isinstance(value, (list, tuple, bytes, bytearray)):
        return "slice"
    if isinstance(value, Mapping) and not isinstance(value, GoStruct):
        return "map"
    if inspect.isroutine(value):
        return "func"
    return "struct"


def _eq(first: Any, *others: Any) -> bool:
    first = _unwrap(first)
    if not others:
        raise _CallError("missing argument for comparison")
    first_kind = _basic_kind(first)
    for other in map(_unwrap, others):
        other_kind = _basic_kind(other)
        if first_kind != other_kind:
            if first is not None and other is not None:
                raise _CallError(
                    f"incompatible types for comparison: {_go_type_name(first)} and {_go_type_name(other)}"
                )
            truth = False
        elif first_kind != "invalid":
            truth = first == other
        elif first is None or other is None:
            truth = first is None and other is None
        elif _reflect_kind(first) != _reflect_kind(other):
            raise _CallError(
                f"non-comparable types {_PRINTER.arg(first, 's', _NO_FLAGS)}: {_go_type_name(first)}, "
                f"{_go_type_name(other)}: {_PRINTER.arg(other, 'v', _NO_FLAGS)}"
            )
        elif _reflect_kind(other) != "struct":
            raise _CallError(
                f"non-comparable type {_PRINTER.arg(other, 's', _NO_FLAGS)}: {_go_type_name(other)}"
            )
        else:
            truth = first == other
        if truth:
            return True
    return False


def _ne(first: Any, second: Any) -> bool:
    return not _eq(first, second)


def _lt(first: Any, second: Any) -> bool:
    first, second = _unwrap(first), _unwrap(second)
    first_kind, second_kind = _basic_kind(first), _basic_kind(second)
    if "invalid" in (first_kind, second_kind):
        raise _CallError("invalid type for comparison")
    if first_kind != second_kind:
        raise _CallError(
            f"incompatible types for comparison: {_go_type_name(first)} and {_go_type_name(second)}"
        )
    if first_kind in ("bool", "complex"):
        raise _CallError("invalid type for comparison")
    return bool(first < second)


def _le(first: Any, second: Any) -> bool:
    return _lt(first, second) or _eq(first, second)


def _gt(first: Any, second: Any) -> bool:
    return not _le(first, second)


def _ge(first: Any, second: Any) -> bool:
    return not _lt(first, second)


def _not(value: Any) -> bool:
    return not _is_true(value)


def _length(item: Any) -> int:
    item = _unwrap(item)
    if item is None:
        raise _CallError("len of nil pointer")
    if isinstance(item, str):
        return len(item.encode("utf-8"))  # Go counts bytes
    if isinstance(item, (bytes, bytearray, list, tuple, Mapping)) and not isinstance(item, GoStruct):
        return len(item)
    raise _CallError(f"len of type {_go_type_name(item)}")


def _index_arg(index: Any, cap: int) -> int:
    index = _unwrap(index)
    if index is None:
        raise _CallError("cannot index slice/array with nil")
    if isinstance(index, bool) or not isinstance(index, int):
        raise _CallError(f"cannot index slice/array with type {_go_type_name(index)}")
    if index < 0 or index > cap:
        raise _CallError(f"index out of range: {index}")
    return index


def _index(item: Any, *indexes: Any) -> Any:
    item = _unwrap(item)
    if item is None:
        raise _CallError("index of untyped nil")
    for index in indexes:
        item = _unwrap(item)
        if item is None:
            raise _CallError("index of nil pointer")
        if isinstance(item, (str, bytes, bytearray, list, tuple)):
            sequence = item.encode("utf-8") if isinstance(item, str) else item
            position = _index_arg(index, len(sequence))
            if position == len(sequence):  # passes Go's check, then reflect panics
                kind = "string" if isinstance(item, str) else "slice"
                raise _CallError(f"reflect: {kind} index out of range")
            item = sequence[position]  # a string yields a byte, as in Go
        elif isinstance(item, Mapping) and not isinstance(item, GoStruct):
            key = _unwrap(index)
            if key is None:
                raise _CallError("value is nil; should be of type string")
            sample = next(iter(item), None)
            if sample is not None and _basic_kind(sample) != _basic_kind(key):
                raise _CallError(f"value has type {_go_type_name(key)}; should be {_go_type_name(sample)}")
            item = item.get(key)  # a missing key is the zero value: nil
        else:
            raise _CallError(f"can't index item of type {_go_type_name(item)}")
    return item


def _slice(item: Any, *indexes: Any) -> Any:
    item = _unwrap(item)
    if item is None:
        raise _CallError("slice of untyped nil")
    if len(indexes) > 3:
        raise _CallError(f"too many slice indexes: {len(indexes)}")
    if isinstance(item, str):
        if len(indexes) == 3:
            raise _CallError("cannot 3-index slice a string")
        sequence: Any = item.encode("utf-8")  # Go slices strings by byte
    elif isinstance(item, (list, tuple, bytes, bytearray)):
        sequence = item
    else:
        raise _CallError(f"can't slice item of type {_go_type_name(item)}")
    bounds = [0, len(sequence), len(sequence)]
    for position, index in enumerate(indexes):
        bounds[position] = _index_arg(index, len(sequence))
    if bounds[0] > bounds[1]:
        raise _CallError(f"invalid slice index: {bounds[0]} > {bounds[1]}")
    if len(indexes) == 3 and bounds[1] > bounds[2]:
        raise _CallError(f"invalid slice index: {bounds[1]} > {bounds[2]}")
    result = sequence[bounds[0]:bounds[1]]
    if isinstance(item, str):
        return result.decode("utf-8", errors="replace")
    return list(result) if isinstance(item, tuple) else result


def _eval_args(args: tuple[Any, ...]) -> str:
    """The text html/js/urlquery escape: a lone string as is, otherwise fmt.Sprint."""
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return _PRINTER.sprint(["<no value>" if arg is None else arg for arg in args])


_HTML_ESCAPES = MappingProxyType({"\0": "\ufffd", '"': "&#34;", "'": "&#39;", "&": "&amp;", "<": "&lt;", ">": "&gt;"})


def _html(*args: Any) -> str:
    return "".join(_HTML_ESCAPES.get(char, char) for char in _eval_args(args))


_JS_ESCAPES = MappingProxyType(
    {"\\": "\\\\", "'": "\\'", '"': '\\"', "<": "\\u003C", ">": "\\u003E", "&": "\\u0026", "=": "\\u003D"}
)


def _js(*args: Any) -> str:
    out = []
    for char in _eval_args(args):
        if char in _JS_ESCAPES:
            out.append(_JS_ESCAPES[char])
        elif ord(char) < 0x20:
            out.append(f"\\u00{ord(char):02X}")
        elif ord(char) >= 0x80 and not char.isprintable():
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return "".join(out)


def _urlquery(*args: Any) -> str:
    return urllib.parse.quote_plus(_eval_args(args), safe="")


def _call(callee_name: str, function: Any, *args: Any) -> Any:
    function = _unwrap(function)
    if function is None:
        raise _CallError("call of nil")
    if not callable(function):
        raise _CallError(f"non-function {callee_name} of type {_go_type_name(function)}")
    return function(*args)


def _json(value: Any) -> str:
    try:
        return _go_json(value)
    except _JSONError:
        return ""  # Ollama ignores json.Marshal's error and prints the empty result


def _current_date(*_format: str) -> str:
    return datetime.date.today().isoformat()


def _yesterday_date(*_format: str) -> str:
    return (datetime.date.today() - datetime.timedelta(days=1)).isoformat()


_TYPESCRIPT_TYPES = MappingProxyType({
    "string": "string", "number": "number", "integer": "number", "boolean": "boolean",
    "array": "any[]", "object": "Record<string, any>", "null": "null",
})


def _member(value: Any, *names: str) -> Any:
    value = _unwrap(value)
    for name in names:
        if isinstance(value, Mapping):
            if name in value:
                return _unwrap(value[name])
        elif hasattr(value, name):
            return _unwrap(getattr(value, name))
    return None


def _to_typescript_type(prop: Any, depth: int = 0) -> str:
    """api.ToolProperty.ToTypeScriptType: anyOf and type lists become unions; enums, item
    types and anything that is not a property map to JSON-schema-blind TypeScript names."""
    _check_value_depth(depth)
    prop = _unwrap(prop)
    if prop is None or isinstance(prop, (str, int, float, list, tuple)):
        return "any"
    any_of = _member(prop, "anyOf", "AnyOf")
    if isinstance(any_of, (list, tuple)) and any_of:
        return " | ".join(_to_typescript_type(option, depth + 1) for option in any_of)
    types = _member(prop, "type", "Type")
    if isinstance(types, str):
        types = [types]
    if not isinstance(types, (list, tuple)) or not types:
        return "any"
    return " | ".join(_TYPESCRIPT_TYPES.get(str(name), "any") for name in types)


_FUNCTIONS: Mapping[str, _Function] = MappingProxyType({
    "and": _Function(lambda *args: None, (_ANY,), _ANY),  # evaluated lazily by the executor
    "or": _Function(lambda *args: None, (_ANY,), _ANY),
    "not": _Function(_not, (_ANY,)),
    "len": _Function(_length, (_ANY,)),
    "index": _Function(_index, (_ANY,), _ANY),
    "slice": _Function(_slice, (_ANY,), _ANY),
    "eq": _Function(_eq, (_ANY,), _ANY),
    "ne": _Function(_ne, (_ANY, _ANY)),
    "lt": _Function(_lt, (_ANY, _ANY)),
    "le": _Function(_le, (_ANY, _ANY)),
    "gt": _Function(_gt, (_ANY, _ANY)),
    "ge": _Function(_ge, (_ANY, _ANY)),
    "print": _Function(lambda *args: _PRINTER.sprint(list(args)), (), _ANY),
    "printf": _Function(lambda fmt, *args: _PRINTER.sprintf(fmt, list(args)), (_STRING,), _ANY),
    "println": _Function(lambda *args: _PRINTER.sprintln(list(args)), (), _ANY),
    "html": _Function(_html, (), _ANY),
    "js": _Function(_js, (), _ANY),
    "urlquery": _Function(_urlquery, (), _ANY),
    "call": _Function(_call, (_ANY,), _ANY),
    # Ollama's FuncMap
    "json": _Function(_json, (_ANY,)),
    "currentDate": _Function(_current_date, (), _STRING),
    "yesterdayDate": _Function(_yesterday_date, (), _STRING),
    "toTypeScriptType": _Function(_to_typescript_type, (_ANY,)),
})
_FUNCTION_NAMES = frozenset(_FUNCTIONS)


# ---------------------------------------------------------------------------------------------
# Executor (text/template/exec.go)

_MISSING: Any = object()  # "no piped value", Go's missingVal; never mutated


class Budget:
    """What the executions that make up one prompt may still spend (MAX_TEMPLATE_STEPS and
    MAX_TEMPLATE_OUTPUT by default). A legacy template runs once per turn: handing each run the
    same Budget bounds the prompt rather than each run. Belongs to one render at a time."""

    __slots__ = ("max_steps", "max_characters", "steps_left", "characters_left")

    def __init__(self, steps: int | None = None, characters: int | None = None) -> None:
        # The limits are read here, not at import, so that tests can lower them.
        self.max_steps = MAX_TEMPLATE_STEPS if steps is None else steps
        self.max_characters = MAX_TEMPLATE_OUTPUT if characters is None else characters
        self.steps_left = self.max_steps
        self.characters_left = self.max_characters


_SIZED = (str, bytes, bytearray, list, tuple, dict)  # not the Mapping ABC: slow to test, on a hot path


def _size(value: Any) -> int:
    """How many characters or items a function argument or result holds (not counting nested)."""
    if isinstance(value, JSONValue):
        value = value.value
    return len(value) if isinstance(value, _SIZED) else 0


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _Executor:
    """One execution: output buffer, variable stack, and the node being evaluated (for error
    locations). Follows Go's state.walk/eval* functions, spending from a Budget as it goes."""

    def __init__(self, template: Template, budget: Budget) -> None:
        self.template = template
        self.budget = budget
        self.out: list[str] = []
        self.vars: list[list[Any]] = []  # [name, value] pairs; a stack with marks
        self.name = ""  # the template being executed, quoted in error messages
        self.node: Node | None = None
        self.depth = 0  # nested control structures, parenthesised pipelines and template calls
        self.calls = 0  # nested {{template}} calls

    # errors

    def errorf(self, message: str, limit: str | None = None) -> NoReturn:
        if self.node is None:
            raise ExecError(f"template: {self.name}: {message}", limit)
        text = self.template.source
        pos = self.node.pos
        line_start = text.rfind("\n", 0, pos) + 1
        line = text.count("\n", 0, pos) + 1
        column = len(text[line_start:pos].encode("utf-8"))
        raise ExecError(
            f"template: :{line}:{column}: executing {_go_quote(self.name)} at <{self.node}>: {message}", limit
        )

    # limits

    def spend(self, steps: int) -> None:
        """Charge the budget. A step is one node walked, command run, argument passed, field
        looked up, loop iteration or map key ranged over, plus the bulk of the data functions
        handle and of the text produced (_ITEMS_PER_STEP, _CHARACTERS_PER_STEP)."""
        budget = self.budget
        budget.steps_left -= steps
        if budget.steps_left < 0:
            self.errorf(_limit_message(
                f"the template ran for more than {budget.max_steps} steps", "MAX_TEMPLATE_STEPS",
                budget.max_steps, "loop less often, or nest fewer loops",
            ), limit="MAX_TEMPLATE_STEPS")

    def produce(self, text: str, built: bool = True) -> str:
        """Count text the template writes or a function returns against the budget. Text that
        was `built` (formatted, escaped, marshalled: character by character) costs steps too."""
        if built:
            self.spend(len(text) // _CHARACTERS_PER_STEP)
        budget = self.budget
        budget.characters_left -= len(text)
        if budget.characters_left < 0:
            self.errorf(_limit_message(
                f"the template produced more than {budget.max_characters} characters, counting text that "
                "functions return", "MAX_TEMPLATE_OUTPUT", budget.max_characters, "write or build less text",
            ), limit="MAX_TEMPLATE_OUTPUT")
        return text

    def enter(self, call: bool = False) -> None:
        """One level deeper (a template call when `call`); pair with `leave` in a finally. The
        executor recurses for each, and template calls can chain templates that each nest up
        to the parse limit."""
        if call and self.calls >= MAX_TEMPLATE_CALL_DEPTH:
            self.errorf(_limit_message(
                f"exceeded maximum template depth: {{{{template}}}} calls nest more than "
                f"{MAX_TEMPLATE_CALL_DEPTH} deep", "MAX_TEMPLATE_CALL_DEPTH", MAX_TEMPLATE_CALL_DEPTH,
                "look for a template that calls itself",
            ), limit="MAX_TEMPLATE_CALL_DEPTH")
        if self.depth >= MAX_TEMPLATE_DEPTH:
            self.errorf(_limit_message(
                f"executing nests more than {MAX_TEMPLATE_DEPTH} levels deep, counting {{{{template}}}} calls",
                "MAX_TEMPLATE_DEPTH", MAX_TEMPLATE_DEPTH, "nest fewer structures and template calls",
            ), limit="MAX_TEMPLATE_DEPTH")
        self.depth += 1
        self.calls += call

    def leave(self, call: bool = False) -> None:
        self.depth -= 1
        self.calls -= call

    # variables

    def var_value(self, name: str) -> Any:
        self.spend(1 + len(self.vars) // _ITEMS_PER_STEP)  # the search below
        for entry in reversed(self.vars):
            if entry[0] == name:
                return entry[1]
        self.errorf(f"undefined variable: {name}")

    def set_var(self, name: str, value: Any) -> None:
        self.spend(1 + len(self.vars) // _ITEMS_PER_STEP)
        for entry in reversed(self.vars):
            if entry[0] == name:
                entry[1] = value
                return
        self.errorf(f"undefined variable: {name}")

    # walking

    def run(self, root: ListNode, data: Any) -> str:
        self.vars = [["$", data]]
        try:
            self.walk(data, root)
        except RecursionError:
            # Not expected within the limits; a caller deep in its own stack could still get here.
            raise ExecError(f"template: {self.name}: " + _limit_message(
                "executing nests too deeply for Python's stack", "MAX_TEMPLATE_DEPTH", MAX_TEMPLATE_DEPTH,
                "nest fewer structures and template calls",
            ), "MAX_TEMPLATE_DEPTH") from None
        return "".join(self.out)

    def walk(self, dot: Any, node: Node) -> None:
        self.node = node
        self.budget.steps_left -= 1  # spend(1), inlined on the hottest path
        if self.budget.steps_left < 0:
            self.spend(0)
        if isinstance(node, ActionNode):
            value = self.eval_pipeline(dot, node.pipe)
            if not node.pipe.decl:  # declarations print nothing
                self.print_value(node, value)
        elif isinstance(node, (IfNode, WithNode)):
            self.walk_if_or_with(dot, node)
        elif isinstance(node, ListNode):
            for child in node.nodes:
                self.walk(dot, child)
        elif isinstance(node, RangeNode):
            self.walk_range(dot, node)
        elif isinstance(node, TemplateNode):
            self.walk_template(dot, node)
        elif isinstance(node, TextNode):
            self.out.append(self.produce(node.text, built=False))
        elif isinstance(node, BreakNode):
            raise _Break()
        elif isinstance(node, ContinueNode):
            raise _Continue()
        else:
            self.errorf(f"unknown node: {node}")

    def walk_if_or_with(self, dot: Any, node: BranchNode) -> None:
        mark = len(self.vars)
        try:
            value = self.eval_pipeline(dot, node.pipe)
            self.enter()
            try:
                if _is_true(value):
                    self.walk(value if isinstance(node, WithNode) else dot, node.list)
                elif node.else_list is not None:
                    self.walk(dot, node.else_list)
            finally:
                self.leave()
        finally:
            del self.vars[mark:]

    def walk_range(self, dot: Any, node: RangeNode) -> None:
        self.node = node
        mark = len(self.vars)
        try:
            value = _unwrap(self.eval_pipeline(dot, node.pipe))
            body_mark = len(self.vars)
            ran = False
            self.enter()
            try:
                try:
                    for index, element in self.range_items(value, node):
                        ran = True
                        self.range_iteration(node, body_mark, index, element)
                except _Break:
                    return
                if not ran and node.else_list is not None:
                    self.walk(dot, node.else_list)
            finally:
                self.leave()
        finally:
            del self.vars[mark:]

    def range_items(self, value: Any, node: RangeNode) -> Iterator[tuple[Any, Any]]:
        # Lazily, so that a loop that breaks early costs only what it ran (templates cannot
        # change the values they range over).
        if isinstance(value, (list, tuple, bytes, bytearray)):
            return enumerate(value)
        if isinstance(value, Mapping) and not isinstance(value, GoStruct):
            self.spend(len(value))  # sorting the keys
            return ((key, value[key]) for key in _sorted_keys(value))
        if isinstance(value, int) and not isinstance(value, bool):  # Go 1.22 range over int
            if len(node.pipe.decl) > 1:
                self.errorf(f"can't use {_PRINTER.arg(value, 'v', _NO_FLAGS)} to iterate over more than one variable")
            return ((None, number) for number in range(value))
        if value is None:
            return iter(())  # like a nil map: not an error
        self.errorf(f"range can't iterate over {_PRINTER.arg(value, 'v', _NO_FLAGS)}")

    def range_iteration(self, node: RangeNode, body_mark: int, index: Any, element: Any) -> None:
        decl, is_assign = node.pipe.decl, node.pipe.is_assign
        if decl:
            if is_assign:
                self.set_var(decl[0].ident[0], index if len(decl) > 1 else element)
            else:
                self.vars[-1][1] = element  # lexically the last variable gets the element
        if len(decl) > 1:
            if is_assign:
                self.set_var(decl[1].ident[0], element)
            else:
                self.vars[-2][1] = index
        try:
            self.walk(element, node.list)
        except _Continue:
            pass
        finally:
            del self.vars[body_mark:]

    def walk_template(self, dot: Any, node: TemplateNode) -> None:
        self.node = node
        tree = self.template._trees.get(node.name)
        if tree is None:
            self.errorf(f"template {_go_quote(node.name)} not defined")
        dot = self.eval_pipeline(dot, node.pipe)  # its variables persist in the caller
        self.node = node
        self.enter(call=True)
        saved = (self.vars, self.name)
        # No dynamic scoping: the called template sees only $.
        self.vars, self.name = [["$", dot]], node.name
        try:
            self.walk(dot, tree)
        finally:
            self.vars, self.name = saved
            self.leave(call=True)

    def print_value(self, node: Node, value: Any) -> None:
        self.node = node
        if inspect.isroutine(value):
            self.errorf(f"can't print {node} of type {_go_type_name(value)}")
        self.out.append(self.produce(_print_value(value), built=not isinstance(value, str)))

    # evaluation

    def eval_pipeline(self, dot: Any, pipe: PipeNode | None) -> Any:
        if pipe is None:
            return None
        self.node = pipe
        value = _MISSING
        for cmd in pipe.cmds:
            value = self.eval_command(dot, cmd, value)  # the previous value is the final argument
        for variable in pipe.decl:
            if pipe.is_assign:
                self.set_var(variable.ident[0], value)
            else:
                self.vars.append([variable.ident[0], value])
        return value

    def eval_nested_pipeline(self, dot: Any, pipe: PipeNode) -> Any:
        """A parenthesised pipeline: evaluating it recurses."""
        self.enter()
        try:
            return self.eval_pipeline(dot, pipe)
        finally:
            self.leave()

    def not_a_function(self, args: tuple[Node, ...] | None, final: Any) -> None:
        if (args is not None and len(args) > 1) or final is not _MISSING:
            assert args is not None
            self.errorf(f"can't give argument to non-function {args[0]}")

    def eval_command(self, dot: Any, cmd: CommandNode, final: Any) -> Any:
        self.budget.steps_left -= 1  # spend(1), inlined on a hot path
        if self.budget.steps_left < 0:
            self.spend(0)
        first = cmd.args[0]
        if isinstance(first, FieldNode):
            return self.eval_field_node(dot, first, cmd.args, final)
        if isinstance(first, ChainNode):
            return self.eval_chain_node(dot, first, cmd.args, final)
        if isinstance(first, IdentifierNode):
            return self.eval_function(dot, first, cmd, cmd.args, final)
        if isinstance(first, PipeNode):
            self.not_a_function(cmd.args, final)
            return self.eval_nested_pipeline(dot, first)
        if isinstance(first, VariableNode):
            return self.eval_variable_node(dot, first, cmd.args, final)
        self.node = first
        self.not_a_function(cmd.args, final)
        if isinstance(first, BoolNode):
            return first.value
        if isinstance(first, DotNode):
            return dot
        if isinstance(first, NilNode):
            self.errorf("nil is not a command")
        if isinstance(first, NumberNode):
            return self.ideal_constant(first)
        if isinstance(first, StringNode):
            return first.text
        self.errorf(f"can't evaluate command {_go_quote(str(first))}")

    def ideal_constant(self, node: NumberNode) -> Any:
        self.node = node
        if node.overflows_int:
            self.errorf(f"{node.text} overflows int")
        return node.value

    def eval_field_node(self, dot: Any, node: FieldNode, args: tuple[Node, ...] | None, final: Any) -> Any:
        self.node = node
        return self.eval_field_chain(dot, dot, node, node.ident, args, final)

    def eval_chain_node(self, dot: Any, node: ChainNode, args: tuple[Node, ...] | None, final: Any) -> Any:
        self.node = node
        if isinstance(node.node, NilNode):
            self.errorf(f"indirection through explicit nil in {node}")
        receiver = self.eval_arg(dot, _ANY, node.node)
        return self.eval_field_chain(dot, receiver, node, node.fields, args, final)

    def eval_variable_node(self, dot: Any, node: VariableNode, args: tuple[Node, ...] | None, final: Any) -> Any:
        self.node = node
        value = self.var_value(node.ident[0])
        if len(node.ident) == 1:
            self.not_a_function(args, final)
            return value
        return self.eval_field_chain(dot, value, node, node.ident[1:], args, final)

    def eval_field_chain(
        self, dot: Any, receiver: Any, node: Node, ident: tuple[str, ...],
        args: tuple[Node, ...] | None, final: Any,
    ) -> Any:
        self.spend(len(ident))
        for position, name in enumerate(ident):
            last = position == len(ident) - 1
            receiver = self.field(
                dot, name, node, args if last else None, final if last else _MISSING, receiver,
                nil_is_interface=position > 0,
            )
        return receiver

    def field(
        self, dot: Any, name: str, node: Node, args: tuple[Node, ...] | None, final: Any,
        receiver: Any, nil_is_interface: bool,
    ) -> Any:
        """Go's evalField: .Name on a map, struct-like object or method.

        Missing map keys: Ollama executes with missingkey=zero on map[string]any values. The zero
        value of `any` is a nil interface, which Go unwraps to an invalid value at the end of the
        pipeline, and an invalid value prints as "<no value>" (golang/go#24963: missingkey=zero
        does not turn that into ""). So a missing key yields None here and prints "<no value>",
        while `print .Missing` gives "<nil>" and `.Missing.Sub` is an error, exactly as in Go.
        """
        if receiver is None:
            # A nil found by a previous field lookup is a nil interface: Go refuses to look
            # inside it. A nil that starts the chain ($x, dot, (pipe)) is an invalid value and
            # yields nil again. (Go also errors for a nil element of a []any reached through
            # range; we do not track where a nil dot came from.)
            if nil_is_interface:
                self.errorf(f"nil pointer evaluating interface {{}}.{name}")
            return None
        has_args = (args is not None and len(args) > 1) or final is not _MISSING
        if isinstance(receiver, JSONValue):
            if name == "String":  # the Go method that makes these types print as JSON
                if has_args:
                    self.errorf(f"wrong number of args for String: want 0 got {len(args or ()) - 1}")
                return self.produce(receiver.json_text())
            receiver = receiver.value
        if isinstance(receiver, GoStruct):
            if name not in receiver:
                self.errorf(f"can't evaluate field {name} in type {receiver.type_name}")
            if has_args:
                self.errorf(f"{name} has arguments but cannot be invoked as function")
            return receiver[name]
        if isinstance(receiver, Mapping):
            if has_args:
                self.errorf(f"{name} is not a method but has arguments")
            return receiver.get(name)
        if isinstance(receiver, (str, bytes, bytearray, int, float, complex, list, tuple)) or name.startswith("_"):
            self.errorf(f"can't evaluate field {name} in type {_go_type_name(receiver)}")
        try:
            member = getattr(receiver, name)
        except AttributeError:
            self.errorf(f"can't evaluate field {name} in type {_go_type_name(receiver)}")
        if inspect.ismethod(member) or inspect.isbuiltin(member):
            method = _Function(member, (), _ANY)
            return self.eval_call(dot, method, node, name, args, final)
        if has_args:
            self.errorf(f"{name} has arguments but cannot be invoked as function")
        return member

    def eval_function(
        self, dot: Any, node: IdentifierNode, cmd: Node, args: tuple[Node, ...] | None, final: Any
    ) -> Any:
        self.node = node
        function = _FUNCTIONS.get(node.name)
        if function is None:
            self.errorf(f"{_go_quote(node.name)} is not a defined function")
        return self.eval_call(dot, function, cmd, node.name, args, final)

    def eval_call(
        self, dot: Any, function: _Function, node: Node, name: str,
        args: tuple[Node, ...] | None, final: Any,
    ) -> Any:
        arg_nodes = args[1:] if args is not None else ()
        count = len(arg_nodes) + (0 if final is _MISSING else 1)
        fixed = len(function.fixed)
        if function.variadic is not None:
            if count < fixed:
                self.errorf(f"wrong number of args for {name}: want at least {fixed} got {len(arg_nodes)}")
        elif count != fixed:
            self.errorf(f"wrong number of args for {name}: want {fixed} got {count}")
        if function is _FUNCTIONS["and"] or function is _FUNCTIONS["or"]:
            # and/or short-circuit and return the deciding value, not a bool.
            value = None
            for arg in arg_nodes:
                self.spend(1)
                value = self.eval_arg(dot, _ANY, arg)
                if _is_true(value) == (name == "or"):
                    return value
            return final if final is not _MISSING else value
        argv = [
            self.eval_arg(dot, function.fixed[i] if i < fixed else function.variadic or _ANY, arg)
            for i, arg in enumerate(arg_nodes)
        ]
        if final is not _MISSING:
            kind = function.fixed[count - 1] if count - 1 < fixed else function.variadic or _ANY
            argv.append(self.validate_type(final, kind))
        if function is _FUNCTIONS["call"]:  # Go passes the callee's name for its messages
            argv.insert(0, str(arg_nodes[0]) if arg_nodes else _PRINTER.arg(final, "s", _NO_FLAGS))
        # Functions take time in proportion to what they walk (len and slice encode strings,
        # eq compares them, printf copies them) and what they build.
        self.spend(len(argv) + sum(map(_size, argv)) // _ITEMS_PER_STEP)
        try:
            result = function.impl(*argv)
        except TemplateError:
            raise
        except Exception as error:  # _CallError, or whatever a called Python function raised
            failure = error  # (Go's safeCall likewise turns panics into errors)
        else:
            if isinstance(result, str):
                return self.produce(result)
            self.spend(_size(result) // _ITEMS_PER_STEP)
            return result
        self.node = node
        self.errorf(f"error calling {name}: {failure}")

    def validate_type(self, value: Any, kind: str) -> Any:
        if kind == _STRING:
            if value is None:
                self.errorf("invalid value; expected string")
            if not isinstance(value, str):
                self.errorf(f"wrong type for value; expected string; got {_go_type_name(value)}")
        return value

    def eval_arg(self, dot: Any, kind: str, node: Node) -> Any:
        self.node = node
        if isinstance(node, DotNode):
            return self.validate_type(dot, kind)
        if isinstance(node, NilNode):
            if kind == _STRING:
                self.errorf("cannot assign nil to string")
            return None
        if isinstance(node, FieldNode):
            return self.validate_type(self.eval_field_node(dot, node, (node,), _MISSING), kind)
        if isinstance(node, VariableNode):
            return self.validate_type(self.eval_variable_node(dot, node, None, _MISSING), kind)
        if isinstance(node, PipeNode):
            return self.validate_type(self.eval_nested_pipeline(dot, node), kind)
        if isinstance(node, IdentifierNode):
            return self.validate_type(self.eval_function(dot, node, node, None, _MISSING), kind)
        if isinstance(node, ChainNode):
            return self.validate_type(self.eval_chain_node(dot, node, None, _MISSING), kind)
        if kind == _STRING:
            if isinstance(node, StringNode):
                return node.text
            self.errorf(f"expected string; found {node}")
        if isinstance(node, BoolNode):
            return node.value
        if isinstance(node, NumberNode):
            return self.ideal_constant(node)
        if isinstance(node, StringNode):
            return node.text
        self.errorf(f"can't handle assignment of {node} to empty interface argument")


# ---------------------------------------------------------------------------------------------
# Introspection and rewriting for Ollama's rules (template/template.go)


def _identifiers(node: Node | None) -> Iterator[str]:
    """Ollama's Identifiers(): names of fields and variables in actions, control pipelines,
    template calls and parenthesised pipelines (not in `(pipe).Field` chains)."""
    if isinstance(node, ListNode):
        for child in node.nodes:
            yield from _identifiers(child)
    elif isinstance(node, (ActionNode, TemplateNode)):
        yield from _identifiers(node.pipe)
    elif isinstance(node, BranchNode):
        yield from _identifiers(node.pipe)
        yield from _identifiers(node.list)
        yield from _identifiers(node.else_list)
    elif isinstance(node, PipeNode):
        for cmd in node.cmds:
            for arg in cmd.args:
                yield from _identifiers(arg)
    elif isinstance(node, (FieldNode, VariableNode)):
        yield from node.ident


class _ResponseCutter:
    """Ollama's deleteNode walk for legacy prompts: keep everything up to and including the
    first `.Response` field (in document order), delete every node after it."""

    def __init__(self) -> None:
        self.cut = False

    def deletes(self, node: Node) -> bool:
        if isinstance(node, FieldNode) and "Response" in node.ident:
            self.cut = True
            return False
        return self.cut

    def walk(self, node: Node) -> Node | None:
        if self.deletes(node):
            return None
        if isinstance(node, ListNode):
            kept = (self.walk(child) for child in node.nodes)
            return replace(node, nodes=tuple(child for child in kept if child is not None))
        if isinstance(node, BranchNode):
            # Like Ollama, the branch's own pipeline is not searched: {{ if .Response }} does
            # not cut, only a .Response inside the body does. Ollama panics when the cut happens
            # in the body and an {{else}} follows; we drop the else list instead.
            body = self.walk(node.list)
            assert isinstance(body, ListNode)
            else_list = self.walk(node.else_list) if node.else_list is not None else None
            assert else_list is None or isinstance(else_list, ListNode)
            return replace(node, list=body, else_list=else_list)
        if isinstance(node, ActionNode):
            pipe = self.walk(node.pipe)
            return None if pipe is None else replace(node, pipe=pipe)
        if isinstance(node, PipeNode):
            cmds = []
            for cmd in node.cmds:
                args = tuple(arg for arg in map(self.walk, cmd.args) if arg is not None)
                if not args:
                    return None
                cmds.append(replace(cmd, args=args))
            return replace(node, cmds=tuple(cmds)) if cmds else None
        return node


# The node Ollama appends to templates that mention neither Messages nor Response.
_RESPONSE_ACTION = ActionNode(
    0, 0, PipeNode(0, 0, False, (), (CommandNode(0, (FieldNode(0, ("Response",)),)),))
)


class Template:
    """A parsed template: immutable, safe to share between threads and requests."""

    __slots__ = ("_source", "_trees")

    def __init__(self, source: str, trees: Mapping[str, ListNode]) -> None:
        self._source = source
        # "" is the main template; the others come from {{define}} and {{block}}.
        self._trees: Mapping[str, ListNode] = MappingProxyType(dict(trees))

    @property
    def source(self) -> str:
        """The template text this was parsed from."""
        return self._source

    @property
    def root(self) -> ListNode:
        """The main template's parse tree."""
        return self._trees.get("", ListNode(0, ()))

    def execute(self, values: Any, budget: Budget | None = None) -> str:
        """Render with `values` as dot and `$`. Raises ExecError with Go's message on failure,
        or naming the limit passed. `budget` is shared by the executions of one prompt; by
        default this execution gets a full one."""
        return _Executor(self, Budget() if budget is None else budget).run(self.root, values)

    def identifiers(self) -> frozenset[str]:
        """Every field and variable name the templates mention, as Ollama's Vars() collects
        them but without lower-casing (Ollama compares lower-cased names)."""
        names: set[str] = set()
        for tree in self._trees.values():
            names.update(_identifiers(tree))
        return frozenset(names)

    def uses(self, field_name: str) -> bool:
        """Whether any template references `field_name` (e.g. "Messages"), case-sensitively,
        in any action, control pipeline or nested block. (Ollama's own mode checks compare
        lower-cased names; use `identifiers()` to do the same.)"""
        return field_name in self.identifiers()

    def cut_after_response(self) -> Template:
        """A copy whose main template stops right after the first `.Response` reference, as
        Ollama renders the last turn of a legacy (System/Prompt/Response) template.

        Ollama's rules: only `.Response` fields count (not `$.Response`, not an if/range/with
        condition, not inside defined templates). Unlike Ollama, whose cut copy loses its custom
        functions and `{{define}}`d templates, this copy keeps both.
        """
        root = _ResponseCutter().walk(self.root)
        assert isinstance(root, ListNode)
        return Template(self._source, {**self._trees, "": root})

    def with_response_appended(self) -> Template:
        """A copy with `{{ .Response }}` appended to the main template, which Ollama does when
        a template mentions neither Messages nor Response."""
        root = replace(self.root, nodes=self.root.nodes + (_RESPONSE_ACTION,))
        return Template(self._source, {**self._trees, "": root})

    def __repr__(self) -> str:
        return f"Template({self._source[:40]!r})"


# Parse trees take up to ~40 bytes per byte of text: the cache keeps those of real templates
# (at most ~150 MB of them), while larger texts, rare and suspect, are parsed each time.
_CACHED_TEMPLATE_SIZE = 32 * 1024


def _check_size(template: str) -> None:
    # UTF-8 is at least a byte per character: only a text that may fit needs encoding.
    size = len(template) if len(template) > MAX_TEMPLATE_SIZE else len(template.encode("utf-8", "surrogatepass"))
    if size > MAX_TEMPLATE_SIZE:
        raise ParseError("template: " + _limit_message(
            f"the template is over {MAX_TEMPLATE_SIZE} bytes long", "MAX_TEMPLATE_SIZE", MAX_TEMPLATE_SIZE,
            "shorten it",
        ), "MAX_TEMPLATE_SIZE")


def parse(template: str) -> Template:
    """Parse Go template text. Raises ParseError with Go's message, e.g.
    `template: :3: unexpected EOF`, or naming the limit passed. Results are cached by text
    (Templates are immutable), except for texts larger than real templates."""
    _check_size(template)
    if len(template) <= _CACHED_TEMPLATE_SIZE:
        return _parse_cached(template)
    return _parse(template)


@functools.lru_cache(maxsize=128)
def _parse_cached(template: str) -> Template:
    return _parse(template)


def _parse(template: str) -> Template:
    try:
        trees = _Parser(template, _FUNCTION_NAMES).parse()
    except RecursionError:
        # Not expected within MAX_TEMPLATE_DEPTH; a caller deep in its own stack could still get here.
        raise ParseError("template: " + _limit_message(
            "the template nests too deeply for Python's stack", "MAX_TEMPLATE_DEPTH", MAX_TEMPLATE_DEPTH,
            "nest fewer if/range/with/block/else-if structures and parentheses",
        ), "MAX_TEMPLATE_DEPTH") from None
    return Template(template, trees)


def render(template: str, values: Any) -> str:
    """Parse (cached) and execute `template` against `values` with Ollama's semantics."""
    return parse(template).execute(values)
