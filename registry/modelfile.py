"""Modelfiles: Ollama's grammar parsed into a typed `Modelfile`, and rendered back as `show --modelfile`.

The grammar is Ollama's current one (docs/ollama-compatibility.md, "Modelfile"): one `COMMAND value` per line,
commands case-insensitive and followed by a space or tab, `#` comments only at the start of a line,
values trimmed, `"…"` and `\"\"\"…\"\"\"` quoting (a value may span lines while its quote is open) with no
escapes, non-printable characters other than tab, CR and LF dropped. `parse` also applies what
Ollama's client does when it turns a Modelfile into a create request: parameter values are typed
(`registry.options`), `stop` accumulates, the last scalar wins, retired parameters become warnings,
REQUIRES must be a semantic version.

Where this module deliberately differs from Ollama:
* Line numbers are those of the line where the problem is. Ollama counts CR and LF separately (a
  CRLF file reports double line numbers) and reports an error found at a line break on the next
  line; "\r\n" is one line break here and errors name the line the break ends.
* Every parse error carries a line number and says what to write instead; Ollama reports several
  of them as a bare `unexpected EOF`. An unclosed quote names the line where the value started.
* An empty FROM, ADAPTER or DRAFT value is refused (Ollama resolves it to the Modelfile's folder).
* All retired parameters (`DEPRECATED_OPTIONS`, including tfs_z, numa, num_gqa, rope_*) are
  warnings; Ollama warns about nine and calls the older ones unknown.
* `render` extends Ollama's quoting rule so that its output always reads back the same (see
  `render`), and raises `UnrenderableModelfile` where the grammar cannot express a value.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from berth.registry.errors import InvalidInput
from berth.registry.options import (
    DEPRECATED_OPTIONS,
    OPTION_SPECS,
    InvalidOption,
    OptionKind,
    OptionValue,
    OptionValues,
    format_parameter_value,
    parse_parameter,
)

MESSAGE_ROLES: Final = ("system", "user", "assistant")
COMMANDS: Final = (
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "draft",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
)

# Ollama's own wording, kept so that people and scripts who know it recognise the error.
_COMMAND_LIST = (
    'command must be one of "from", "license", "template", "system", "adapter", "draft", '
    '"renderer", "parser", "parameter", "message", or "requires"'
)
_ROLE_LIST = 'message role must be one of "system", "user", or "assistant"'

_EXAMPLES: Final = {
    "from": "FROM llama3.2",
    "parameter": "PARAMETER temperature 0.7",
    "template": 'TEMPLATE """{{ .Prompt }}"""',
    "system": 'SYSTEM "You are a helpful assistant."',
    "adapter": "ADAPTER ./adapter.gguf",
    "license": 'LICENSE """<license text>"""',
    "message": "MESSAGE user Hello",
    "requires": "REQUIRES 0.14.0",
    "draft": "DRAFT ./draft.gguf",
    "renderer": "RENDERER <name>",
    "parser": "PARSER <name>",
}

_BLANKS: Final = frozenset(" \t")
_LINE_BREAKS: Final = frozenset("\r\n")
_ASCII_LETTERS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_NAME_CHARACTERS: Final = _ASCII_LETTERS | frozenset("0123456789_")

# golang.org/x/mod/semver's grammar: vMAJOR[.MINOR[.PATCH[-PRERELEASE][+BUILD]]], no leading zeros.
_NUMBER = r"(?:0|[1-9][0-9]*)"
_PRERELEASE_PART = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_BUILD_PART = r"[0-9A-Za-z-]+"
_SEMVER = re.compile(
    rf"v{_NUMBER}(?:\.{_NUMBER}(?:\.{_NUMBER}"
    rf"(?:-{_PRERELEASE_PART}(?:\.{_PRERELEASE_PART})*)?"
    rf"(?:\+{_BUILD_PART}(?:\.{_BUILD_PART})*)?)?)?"
)


class ModelfileError(InvalidInput):
    """A Modelfile breaks the grammar or names a bad parameter; the message starts `(line N): `."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"(line {line}): {problem}")
        self.line = line
        self.problem = problem


class UnrenderableModelfile(InvalidInput):
    """A model holds a value that Modelfile text cannot express so that it reads back the same."""


@dataclass(frozen=True)
class Message:
    """One message of a model's built-in history (`MESSAGE <role> <content>`)."""

    role: str
    content: str


@dataclass(frozen=True)
class Modelfile:
    """A parsed Modelfile.

    `from_` holds every FROM in order (the model, then e.g. a vision projector); `parameters` holds
    typed values (`stop` as a tuple); `template`, `system`, `requires`, `renderer`, `parser` and
    `draft` are None when absent and keep the last value when repeated. `warnings` are not part of
    a model's identity, so two Modelfiles that differ only there compare equal.
    """

    from_: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()
    template: str | None = None
    system: str | None = None
    parameters: Mapping[str, OptionValue] = field(default_factory=OptionValues, hash=False)
    messages: tuple[Message, ...] = ()
    licenses: tuple[str, ...] = ()
    requires: str | None = None
    renderer: str | None = None
    parser: str | None = None
    draft: str | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        # Accept lists and plain dicts from callers, but keep the instance immutable all the way down.
        for name in ("from_", "adapters", "messages", "licenses", "warnings"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        # A parameter without a value (None, or a stop list with no strings) is not set: that is
        # how a Modelfile says it, so it is how the model is compared.
        parameters = {
            name: tuple(value) if isinstance(value, list) else value
            for name, value in self.parameters.items()
            if value is not None and value != () and value != []
        }
        object.__setattr__(self, "parameters", OptionValues(parameters))


# ---------------------------------------------------------------------------------------------
# Parsing


def parse(source: str | bytes) -> Modelfile:
    """Parse Modelfile text (or bytes: a UTF-8 or UTF-16 byte-order mark selects the decoding).

    Raises ModelfileError, whose message starts with `(line N): `, for the first problem found:
    grammar errors anywhere come first, then a missing FROM, then bad values in file order.
    """
    commands = _scan(_decode(source))
    if not any(command.keyword == "from" for command in commands):
        raise ModelfileError(
            1, f'no FROM line; add one naming the base model or weights, e.g. {_EXAMPLES["from"]}'
        )
    return _build(commands)


def _decode(source: str | bytes) -> str:
    if isinstance(source, str):
        return source.removeprefix("\ufeff")
    # As Go's unicode.BOMOverride: a BOM picks the decoding, anything else is UTF-8; bad bytes
    # become U+FFFD rather than an error.
    for bom, encoding in (
        (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"),
    ):
        if source.startswith(bom):
            return source[len(bom) :].decode(encoding, "replace")
    return source.decode("utf-8", "replace")


@dataclass(frozen=True)
class _Command:
    keyword: str  # lower case
    name: str  # the PARAMETER name or the MESSAGE role; empty for other commands
    value: str
    line: int


class _Cursor:
    """A position in the text that knows its 1-based line; "" stands for the end of the text."""

    __slots__ = ("text", "position", "line")

    def __init__(self, text: str) -> None:
        self.text = text
        self.position = 0
        self.line = 1

    def peek(self) -> str:
        return self.text[self.position] if self.position < len(self.text) else ""

    def at_end(self) -> bool:
        return self.position >= len(self.text)

    def advance(self) -> str:
        char = self.text[self.position]
        self.position += 1
        # "\r\n" is one line break: the "\r" counts it, the "\n" after it does not.
        if char == "\r" or (char == "\n" and self.text[self.position - 2 : self.position - 1] != "\r"):
            self.line += 1
        return char

    def take_while(self, allowed: frozenset[str]) -> str:
        start = self.position
        while self.peek() in allowed:
            self.position += 1  # never a line break, so the line count stands
        return self.text[start : self.position]

    def token(self) -> str:
        """The rest of the current word, for error messages (nothing is consumed)."""
        end = self.position
        while end < len(self.text) and self.text[end] not in _BLANKS and self.text[end] not in _LINE_BREAKS:
            end += 1
        return self.text[self.position : end]


def _scan(text: str) -> list[_Command]:
    cursor = _Cursor(text)
    commands: list[_Command] = []
    while not cursor.at_end():
        char = cursor.peek()
        if char in _BLANKS or char in _LINE_BREAKS:
            cursor.advance()
        elif char == "#":
            while not cursor.at_end() and cursor.peek() not in _LINE_BREAKS:
                cursor.advance()
        else:
            commands.append(_scan_command(cursor))
    return commands


def _scan_command(cursor: _Cursor) -> _Command:
    line = cursor.line
    # As in Ollama, whatever starts a line is the first character of the command word (dropped if
    # non-printable), and the word goes on over ASCII letters.
    first = cursor.advance()
    word = (first if first.isprintable() else "") + cursor.take_while(_ASCII_LETTERS)
    keyword = word.lower()
    after = cursor.peek()
    if keyword not in COMMANDS or not (after == "" or after in _BLANKS or after in _LINE_BREAKS):
        raise ModelfileError(
            line,
            f"{_COMMAND_LIST}; found {_show(word + cursor.token())}. "
            f'Write one command and its value per line, e.g. {_EXAMPLES["from"]}; comment lines start with #',
        )
    if after not in _BLANKS:
        raise ModelfileError(
            line, f'{keyword.upper()} needs a value after a space on the same line, e.g. {_EXAMPLES[keyword]}'
        )
    cursor.advance()
    name = ""
    if keyword == "parameter":
        name = _scan_parameter_name(cursor, line)
    elif keyword == "message":
        name = _scan_message_role(cursor, line)
    value_start = cursor.position
    value = _scan_value(cursor)
    if value is None:
        raise _unclosed_quote(cursor.text[value_start:], keyword, line)
    return _Command(keyword, name, value, line)


def _scan_parameter_name(cursor: _Cursor, line: int) -> str:
    name = cursor.take_while(_NAME_CHARACTERS)
    after = cursor.peek()
    if name and after in _BLANKS:
        cursor.advance()
        return name
    if not name and (after == "" or after in _BLANKS or after in _LINE_BREAKS):
        raise ModelfileError(
            line, f'PARAMETER needs a name, one space, then a value, e.g. {_EXAMPLES["parameter"]}'
        )
    if after == "" or after in _LINE_BREAKS:
        raise ModelfileError(
            line, f"PARAMETER {name} has no value; write it on the same line: PARAMETER {name} <value>"
        )
    raise ModelfileError(
        line,
        f"parameter name {_show(name + cursor.token())} may contain only letters, digits and _; "
        f'write PARAMETER <name> <value>, e.g. {_EXAMPLES["parameter"]}',
    )


def _scan_message_role(cursor: _Cursor, line: int) -> str:
    role = cursor.take_while(_ASCII_LETTERS)
    after = cursor.peek()
    if role in MESSAGE_ROLES:
        if after in _BLANKS:
            cursor.advance()
            return role
        if after == "" or after in _LINE_BREAKS:
            raise ModelfileError(
                line, f'MESSAGE {role} has no content; write it on the same line: MESSAGE {role} <content>'
            )
    found = role if after in _BLANKS else role + cursor.token()
    raise ModelfileError(
        line, f'{_ROLE_LIST} (lower case); found {_show(found)}. Write e.g. {_EXAMPLES["message"]}'
    )


def _scan_value(cursor: _Cursor) -> str | None:
    """Read a value up to the first line break at which it is complete; None at EOF inside quotes.

    Ollama's rule: at each line break the text read so far, trimmed, is complete unless it opens a
    quote it has not closed: it starts with `\"\"\"` but is shorter than 6 or does not end with `\"\"\"`,
    or it starts with `"` but is just `"` or does not end with `"`. Incomplete text keeps its line
    breaks and reading goes on.
    """
    chars: list[str] = []
    first = -1  # index of the first character that trimming keeps, -1 while there is none
    last = -1  # index of the last one
    while True:
        char = cursor.peek()
        if char == "" or char in _LINE_BREAKS:
            if _is_complete(chars, first, last):
                if char:
                    cursor.advance()
                return _unquote("".join(chars[first : last + 1])) if first >= 0 else ""
            if char == "":
                return None
            chars.append(char)
        elif char in _BLANKS:
            chars.append(char)
        elif char.isprintable():
            chars.append(char)
            last = len(chars) - 1
            if first < 0:
                first = last
        # Any other character (control, format, non-ASCII space…) is dropped, as Ollama does.
        cursor.advance()


def _is_complete(chars: list[str], first: int, last: int) -> bool:
    if first < 0 or chars[first] != '"':
        return True
    length = last - first + 1
    if length >= 3 and chars[first + 1] == '"' and chars[first + 2] == '"':
        return length >= 6 and chars[last] == chars[last - 1] == chars[last - 2] == '"'
    return length >= 2 and chars[last] == '"'


def _unquote(trimmed: str) -> str:
    # Only called on complete text, so an opening quote always has its closing one.
    if trimmed.startswith('"""'):
        return trimmed[3:-3]
    if trimmed.startswith('"'):
        return trimmed[1:-1]
    return trimmed


def _unclosed_quote(rest_of_text: str, keyword: str, line: int) -> ModelfileError:
    # Which quote was left open: look at the value as the scanner kept it (non-printables dropped).
    kept = "".join(char for char in rest_of_text if char.isprintable() or char in "\t\r\n")
    quote = '"""' if kept.strip(" \t\r\n").startswith('"""') else '"'
    return ModelfileError(
        line,
        f"unexpected EOF: the {keyword.upper()} value opened with {quote} on this line is never closed; "
        f"end it with {quote}",
    )


def _build(commands: list[_Command]) -> Modelfile:
    from_: list[str] = []
    adapters: list[str] = []
    licenses: list[str] = []
    messages: list[Message] = []
    warnings: list[str] = []
    parameters: dict[str, OptionValue] = {}
    last_value: dict[str, str] = {}  # template, system, requires, renderer, parser, draft
    for command in commands:
        keyword, value, line = command.keyword, command.value, command.line
        if keyword in ("from", "adapter", "draft") and not value:
            raise ModelfileError(
                line, f'{keyword.upper()} needs a model name or a path, e.g. {_EXAMPLES[keyword]}'
            )
        if keyword == "from":
            from_.append(value)
        elif keyword == "adapter":
            adapters.append(value)
        elif keyword == "license":
            licenses.append(value)
        elif keyword == "message":
            messages.append(Message(command.name, value))
        elif keyword == "requires":
            last_value[keyword] = _normalize_requires(value, line)
        elif keyword == "parameter":
            name = command.name
            if name in DEPRECATED_OPTIONS:
                warnings.append(f"(line {line}): parameter {name} is deprecated and ignored; remove the line")
                continue
            typed = _parse_parameter(name, value, line)
            previous = parameters.get(name)
            if isinstance(typed, tuple) and isinstance(previous, tuple):
                typed = previous + typed  # `stop` accumulates across lines
            parameters[name] = typed
        else:
            last_value[keyword] = value
    return Modelfile(
        from_=tuple(from_),
        adapters=tuple(adapters),
        template=last_value.get("template"),
        system=last_value.get("system"),
        parameters=OptionValues(parameters),
        messages=tuple(messages),
        licenses=tuple(licenses),
        requires=last_value.get("requires"),
        renderer=last_value.get("renderer"),
        parser=last_value.get("parser"),
        draft=last_value.get("draft"),
        warnings=tuple(warnings),
    )


_KIND_HINTS: Final = {
    OptionKind.INT: "takes a whole number, e.g. 42",
    OptionKind.FLOAT: "takes a number, e.g. 0.7",
    OptionKind.BOOL: "takes true or false",
    OptionKind.STRING_LIST: "takes text",
}


def _parse_parameter(name: str, value: str, line: int) -> OptionValue:
    try:
        return parse_parameter(name, value)
    except InvalidOption as error:
        spec = OPTION_SPECS.get(name)
        if spec is None:
            hint = "parameter names are lower case, e.g. temperature, num_ctx, stop"
        else:
            hint = f"PARAMETER {name} {_KIND_HINTS[spec.kind]}"
        raise ModelfileError(line, f"{error.message}; {hint}") from error


def _normalize_requires(value: str, line: int) -> str:
    """REQUIRES as Ollama keeps it: a semantic version, `v` prefix optional, stored without it."""
    versioned = value if value.startswith("v") else "v" + value
    if not _SEMVER.fullmatch(versioned):
        raise ModelfileError(line, f"requires must be a valid semver (e.g. 0.14.0); found {_show(value)}")
    return versioned[1:]


def _show(text: str) -> str:
    """A fragment of user text, quoted and escaped for an error message, cut to a readable length."""
    return json.dumps(text if len(text) <= 40 else text[:40] + "…", ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Rendering

_SHOW_HEADER: Final = (
    '# Modelfile generated by "berth show"',
    "# To build a new Modelfile based on this, replace FROM with:",
)


def render(modelfile: Modelfile, *, short_name: str | None = None, strict: bool = True) -> str:
    """Modelfile text for a model, laid out as `ollama show --modelfile` lays it out.

    With `short_name`, the text opens with Ollama's comment header (`# FROM <short_name>`). Then:
    FROM (the first), ADAPTER, DRAFT, FROM (the others), TEMPLATE, SYSTEM, RENDERER, PARSER,
    REQUIRES, PARAMETER lines sorted by name (one line per `stop` value), LICENSE, MESSAGE.

    Quoting is Ollama's rule: a value with a line break or a leading or trailing blank is wrapped in
    `\"\"\"` if it contains `"`, else in `"`; other values are written raw. Extended so that the text
    always reads back the same: CR counts as a line break, a tab as a blank, and a value that
    starts with `"` or is empty is wrapped too. Ints are written in plain decimal (Ollama writes
    `1e+06` for 1000000, which it cannot read back). FROM values are quoted by the same rule
    (Ollama writes them raw), which changes nothing for ordinary names and paths.

    With `strict` (the default), `parse(render(m)) == m` or UnrenderableModelfile is raised: for a
    value with a line that ends in `\"\"\"` (the grammar has no escapes), a non-printable character
    (the parser drops them), an unknown or retired parameter, a value that does not read back as
    itself, a message role other than system/user/assistant, an invalid REQUIRES. With
    `strict=False` such values are written anyway, as Ollama would, for display (`/api/show`).
    """
    if not modelfile.from_:
        raise UnrenderableModelfile('a Modelfile needs at least one FROM; set Modelfile.from_, e.g. ("llama3.2",)')
    lines: list[str] = []
    if short_name is not None:
        if any(char in _LINE_BREAKS for char in short_name):
            raise UnrenderableModelfile(f"the short name {_show(short_name)} must not contain a line break")
        lines.extend(_SHOW_HEADER)
        lines.extend((f"# FROM {short_name}", ""))

    def add(keyword: str, value: str, prefix: str = "") -> None:
        what = f"{keyword} {prefix}".rstrip()
        if strict and keyword in ("FROM", "ADAPTER", "DRAFT") and not value:
            raise UnrenderableModelfile(f"{keyword} has an empty value; it needs a model name or a path")
        lines.append(f"{keyword} {prefix}{_quote(value, what, strict)}")

    model, *projectors = modelfile.from_
    add("FROM", model)
    for adapter in modelfile.adapters:
        add("ADAPTER", adapter)
    if modelfile.draft is not None:
        add("DRAFT", modelfile.draft)
    for projector in projectors:
        add("FROM", projector)
    for keyword, text in (
        ("TEMPLATE", modelfile.template),
        ("SYSTEM", modelfile.system),
        ("RENDERER", modelfile.renderer),
        ("PARSER", modelfile.parser),
        ("REQUIRES", modelfile.requires),
    ):
        if text is not None:
            if strict and keyword == "REQUIRES":
                _check_requires(text)
            add(keyword, text)
    for name in sorted(modelfile.parameters):
        value = modelfile.parameters[name]
        for item in value if isinstance(value, tuple) else (value,):
            text = _parameter_text(name, item, strict)
            add("PARAMETER", text, prefix=f"{name} ")
    for license_text in modelfile.licenses:
        add("LICENSE", license_text)
    for message in modelfile.messages:
        if strict and message.role not in MESSAGE_ROLES:
            raise UnrenderableModelfile(f"{_ROLE_LIST}; a message has role {_show(message.role)}")
        add("MESSAGE", message.content, prefix=f"{message.role} ")
    text = "\n".join(lines) + "\n"
    if strict:
        _check_reads_back(modelfile, text)
    return text


def _parameter_text(name: str, value: object, strict: bool) -> str:
    if not strict:
        return format_parameter_value(value) if isinstance(value, (int, float, str)) else str(value)
    if name not in OPTION_SPECS:
        state = "retired" if name in DEPRECATED_OPTIONS else "unknown"
        raise UnrenderableModelfile(f"parameter {name!r} is {state}; a Modelfile could not be read back with it")
    if not isinstance(value, (int, float, str)):
        raise UnrenderableModelfile(
            f"parameter {name} has a {type(value).__name__} value; expected a number, bool or text"
        )
    text = format_parameter_value(value)
    try:
        read_back = parse_parameter(name, text)
    except InvalidOption as error:
        raise UnrenderableModelfile(f"parameter {name} = {value!r} cannot be written: {error.message}") from error
    expected = (value,) if isinstance(read_back, tuple) else value
    if read_back != expected or isinstance(read_back, bool) != isinstance(value, bool):
        kind = OPTION_SPECS[name].kind
        if kind is OptionKind.FLOAT:
            advice = "it keeps float32 precision; round the value first"
        else:
            advice = f"it takes {kind.value} values"
        raise UnrenderableModelfile(f"parameter {name} = {value!r} would read back as {read_back!r}; {advice}")
    return text


def _check_requires(text: str) -> None:
    try:
        normalized = _normalize_requires(text, 0)
    except ModelfileError as error:
        raise UnrenderableModelfile(error.problem) from error
    if normalized != text:
        raise UnrenderableModelfile(
            f'REQUIRES {_show(text)} would read back as {_show(normalized)}; store it without the "v"'
        )


def _quote(value: str, what: str, strict: bool) -> str:
    """Ollama's spelling of a value (extended, see `render`), checked to read back as the value."""
    spelling = _spelling(value)
    if strict and _read_back(spelling) != value:
        dropped = next((char for char in value if not (char.isprintable() or char in "\t\r\n")), None)
        if dropped is not None:
            reason = f"it contains U+{ord(dropped):04X}, a non-printable character the parser drops"
        else:
            # Inside """ such a line closes the value early, and inside " it does too; there are no escapes.
            reason = 'a line in it ends with """, which closes any quote early, and the grammar has no escapes'
        raise UnrenderableModelfile(
            f"the {what} value {_show(value)} cannot be written so that it reads back the same: {reason}"
        )
    return spelling


def _spelling(value: str) -> str:
    needs_quotes = (
        not value
        or any(char in _LINE_BREAKS for char in value)
        or value[0] in _BLANKS
        or value[-1] in _BLANKS
        or value[0] == '"'
    )
    if not needs_quotes:
        return value
    return f'"""{value}"""' if '"' in value else f'"{value}"'


def _read_back(spelling: str) -> str | None:
    cursor = _Cursor(spelling + "\n")
    value = _scan_value(cursor)
    return value if cursor.at_end() else None


def _check_reads_back(modelfile: Modelfile, text: str) -> None:
    # Every value was checked on its own; this guards the whole (order, accumulation, last-wins).
    try:
        again = parse(text)
    except ModelfileError as error:
        raise UnrenderableModelfile(f"the rendered Modelfile does not parse: {error.message}") from error
    if again != modelfile:
        fields = ("from_", "adapters", "template", "system", "parameters", "messages", "licenses")
        fields += ("requires", "renderer", "parser", "draft")
        differing = [name for name in fields if getattr(again, name) != getattr(modelfile, name)]
        raise UnrenderableModelfile(f"the rendered Modelfile reads back differently in: {', '.join(differing)}")
