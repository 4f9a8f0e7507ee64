"""Ollama's runtime options: one typed table, and the parsers for the ways values arrive and leave.

Values arrive as JSON (a request's `options`, a create request's `parameters`), as text (a
Modelfile's `PARAMETER temperature 0.7`, the REPL's `/set parameter`), and leave as the
`parameters` text of `/api/show`. Every path checks names and types against `OPTION_SPECS`, so the
rest of Berth handles typed values only. Behaviour follows Ollama's `api.Options` (`FromMap`,
`FormatParams`, `DefaultOptions`); see docs/ollama-compatibility.md, "API: options".

Typed values are `int`, `float` (rounded to float32 and kept in its shortest decimal form, which
is what Ollama stores), `bool`, and `tuple[str, ...]` for `stop`, the only list.
"""

from __future__ import annotations

import enum
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn, TypeAlias

from berth.registry.errors import InvalidField, InvalidInput

OptionValue: TypeAlias = int | float | bool | tuple[str, ...]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


class OptionKind(enum.Enum):
    """The type of an option; the value is the type name Ollama's error messages use."""

    INT = "integer"
    FLOAT = "float32"
    BOOL = "boolean"
    STRING_LIST = "array"


@dataclass(frozen=True)
class OptionSpec:
    """One current option: its name, type, built-in default and whether it is fixed at load time.

    `default` is None where Ollama decides at load time (num_ctx from OLLAMA_CONTEXT_LENGTH or the
    VRAM tier, main_gpu and use_mmap "unset"). `runner` options belong to a loaded runner's
    identity: a request that changes one forces a reload.
    """

    name: str
    kind: OptionKind
    default: OptionValue | None
    runner: bool = False
    # The values llama.cpp can be given (numbers only; None: no bound that side), and what they
    # mean, for the error: a value outside them is refused before it reaches a runner.
    low: int | float | None = None
    high: int | float | None = None
    meaning: str = ""

    def check(self, value: OptionValue) -> OptionValue:
        """`value` if it is within the bounds; InvalidOption naming the option and its range if not."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
                low = "" if self.low is None else f"from {self.low} "
                high = "up" if self.high is None else f"to {self.high}"
                raise InvalidOption(self.name, f'option "{self.name}" is {value}; it must be {low}{high}'
                                               + (f" ({self.meaning})" if self.meaning else ""))
        elif isinstance(value, tuple):
            if len(value) > MAX_STOPS or any(len(item) > MAX_STOP_LENGTH for item in value):
                raise InvalidOption(self.name, f'option "{self.name}" takes at most {MAX_STOPS} strings of at '
                                               f"most {MAX_STOP_LENGTH} characters each")
        return value


# int32, what llama.cpp's C API takes for counts and token numbers.
_INT32_MAX = 2**31 - 1
# Stop strings are matched against the text after every token: their count and length set that cost.
MAX_STOPS = 64
MAX_STOP_LENGTH = 1024
# A context past any model's training, and more threads than any machine has, are mistakes.
MAX_CONTEXT = 1 << 22
MAX_THREADS = 1024

_SPECS: tuple[OptionSpec, ...] = (
    OptionSpec("num_keep", OptionKind.INT, 4, low=-1, high=_INT32_MAX, meaning="-1 keeps the whole prompt"),
    OptionSpec("seed", OptionKind.INT, -1),
    OptionSpec("num_predict", OptionKind.INT, -1, low=-2, high=_INT32_MAX,
               meaning="-1: no limit, -2: fill the context"),
    OptionSpec("top_k", OptionKind.INT, 40, low=0, high=_INT32_MAX, meaning="0 turns it off"),
    OptionSpec("top_p", OptionKind.FLOAT, 0.9, low=0.0, high=1.0),
    OptionSpec("min_p", OptionKind.FLOAT, 0.0, low=0.0, high=1.0),
    OptionSpec("typical_p", OptionKind.FLOAT, 1.0, low=0.0, high=1.0),
    OptionSpec("repeat_last_n", OptionKind.INT, 64, low=-1, high=_INT32_MAX,
               meaning="-1: the whole context, 0: off"),
    OptionSpec("temperature", OptionKind.FLOAT, 0.8),
    OptionSpec("repeat_penalty", OptionKind.FLOAT, 1.0),
    OptionSpec("presence_penalty", OptionKind.FLOAT, 0.0),
    OptionSpec("frequency_penalty", OptionKind.FLOAT, 0.0),
    OptionSpec("stop", OptionKind.STRING_LIST, ()),
    OptionSpec("num_ctx", OptionKind.INT, None, runner=True, low=0, high=MAX_CONTEXT,
               meaning="0: the default; more than the model was trained for is cut to that"),
    OptionSpec("num_batch", OptionKind.INT, 512, runner=True, low=1, high=MAX_CONTEXT),
    OptionSpec("num_gpu", OptionKind.INT, -1, runner=True, low=-1, high=_INT32_MAX,
               meaning="-1: as many layers as fit"),
    OptionSpec("main_gpu", OptionKind.INT, None, runner=True, low=0, high=255),
    OptionSpec("use_mmap", OptionKind.BOOL, None, runner=True),
    OptionSpec("num_thread", OptionKind.INT, 0, runner=True, low=0, high=MAX_THREADS,
               meaning="0: one per physical core"),
    OptionSpec("draft_num_predict", OptionKind.INT, 4, runner=True, low=0, high=1024),
)

OPTION_SPECS: Mapping[str, OptionSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})
"""Every option the current server understands, by name, in Ollama's declaration order."""

RUNNER_OPTIONS: frozenset[str] = frozenset(spec.name for spec in _SPECS if spec.runner)
"""The load-time options: a change in one of these needs a different runner."""

DEPRECATED_OPTIONS: frozenset[str] = frozenset(
    {
        # Ollama's own list: a Modelfile using these gets a warning, not an error.
        "penalize_newline",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mlock",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        # Removed earlier (tfs_z, numa, num_gqa, rope_*) or never a server option (embedding_only);
        # old clients and old Modelfiles still send them, so they are accepted and ignored too.
        "tfs_z",
        "numa",
        "num_gqa",
        "rope_frequency_base",
        "rope_frequency_scale",
        "embedding_only",
    }
)
"""Retired option names: accepted anywhere, reported as ignored, never applied."""


class InvalidOption(InvalidField):
    """An option or parameter has an unknown name, a value of the wrong type or out of range."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"options.{option}", message)
        self.option = option


class OptionValues(dict[str, OptionValue]):
    """A read-only dict of typed option values.

    A dict (not a mapping proxy) so that it serialises with `json` and pydantic as-is; read-only so
    that a model's parameters cannot be changed by whoever holds them. Build new ones with `merge`.
    """

    __slots__ = ()

    def _refuse(self) -> NoReturn:
        raise TypeError("option values are read-only; build a new set with registry.options.merge()")

    def __setitem__(self, key: str, value: OptionValue) -> NoReturn:
        self._refuse()

    def __delitem__(self, key: str) -> NoReturn:
        self._refuse()

    def __ior__(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse()

    def clear(self) -> NoReturn:
        self._refuse()

    def pop(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse()

    def popitem(self) -> NoReturn:
        self._refuse()

    def setdefault(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse()

    def update(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse()

    def __reduce__(self) -> tuple[type[OptionValues], tuple[dict[str, OptionValue]]]:
        # pickle and copy would otherwise rebuild the dict through the refused __setitem__.
        return (OptionValues, (dict(self),))

    def __copy__(self) -> OptionValues:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> OptionValues:
        return self


@dataclass(frozen=True)
class ParsedOptions:
    """The result of `parse_options`: typed values given in the request, and the keys ignored."""

    values: OptionValues = field(default_factory=OptionValues, hash=False)
    ignored: tuple[str, ...] = ()

    @property
    def deprecated(self) -> tuple[str, ...]:
        """The ignored keys that are retired options (the rest are unknown names)."""
        return tuple(name for name in self.ignored if name in DEPRECATED_OPTIONS)


def default_options() -> OptionValues:
    """The built-in defaults, leaving out those decided at load time (num_ctx, main_gpu, use_mmap)."""
    return OptionValues({spec.name: spec.default for spec in _SPECS if spec.default is not None})


def merge(*layers: Mapping[str, OptionValue | None]) -> OptionValues:
    """Layer option sets, later ones winning key by key: defaults, then model, then request.

    A None value means "not set" and never hides a value from an earlier layer. A list (`stop`)
    replaces the earlier list rather than extending it, as in Ollama.
    """
    merged: dict[str, OptionValue] = {}
    for layer in layers:
        for name, value in layer.items():
            if value is not None:
                merged[name] = value
    return OptionValues(merged)


def runner_options(values: Mapping[str, OptionValue]) -> OptionValues:
    """The load-time subset of a set of values, which identifies the runner they need."""
    return OptionValues({name: value for name, value in values.items() if name in RUNNER_OPTIONS})


def parse_options(raw: Mapping[str, object] | None) -> ParsedOptions:
    """Type-check a JSON `options` object as Ollama's `Options.FromMap` does.

    Ints take any JSON number (a float is truncated toward zero), floats take ints, bools take only
    bools, `stop` takes a list of strings (a single string is taken as a one-item list). None
    values are skipped. Unknown and retired keys are collected in `ignored`, not rejected. A value
    of the wrong type raises InvalidOption with Ollama's text, e.g.
    `option "top_k" must be of type integer`.
    """
    if raw is None:
        return ParsedOptions()
    if not isinstance(raw, Mapping):
        raise InvalidInput("options must be a JSON object mapping option names to values")
    values: dict[str, OptionValue] = {}
    ignored: list[str] = []
    for name, value in raw.items():
        spec = OPTION_SPECS.get(name)
        if spec is None:
            ignored.append(name)
            continue
        if value is None:
            continue
        values[name] = spec.check(_from_json(spec, value))
    return ParsedOptions(OptionValues(values), tuple(ignored))


def _from_json(spec: OptionSpec, value: object) -> OptionValue:
    wrong_type = f'option "{spec.name}" must be of type {spec.kind.value}'
    if spec.kind is OptionKind.STRING_LIST:
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, (list, tuple)):
            raise InvalidOption(spec.name, wrong_type)
        if not all(isinstance(item, str) for item in value):
            # Ollama's wording, odd grammar included, so clients matching on it keep working.
            raise InvalidOption(spec.name, f'option "{spec.name}" must be of an array of strings')
        return tuple(value)
    if spec.kind is OptionKind.BOOL:
        if not isinstance(value, bool):
            raise InvalidOption(spec.name, wrong_type)
        return value
    # bool is an int in Python but a distinct JSON type; Ollama rejects it for numbers.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidOption(spec.name, wrong_type)
    if spec.kind is OptionKind.INT:
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidOption(spec.name, f"{wrong_type}, not {value}")
        number = int(value)  # truncates toward zero, like Go's int64(float64)
        if not _INT64_MIN <= number <= _INT64_MAX:
            raise InvalidOption(spec.name, f"{wrong_type} between {_INT64_MIN} and {_INT64_MAX}")
        return number
    single = _to_float32(float(value))
    if single is None:
        raise InvalidOption(spec.name, f"{wrong_type}: a finite number within float32 range")
    return single


_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
# Go's strconv.ParseInt(s, 10, 64) and ParseFloat syntax: no spaces, no underscores (Go allows
# them only after a base prefix), a hex float needs its p exponent. Python's int() and float() are
# more lenient, so the text is matched first.
_GO_INT = re.compile(r"[+-]?[0-9]+")
_GO_DECIMAL_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_GO_HEX_FLOAT = re.compile(r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?[0-9]+")


def parse_parameter(name: str, value: str) -> OptionValue:
    """Type one text value, as a Modelfile `PARAMETER` line or the REPL's `/set parameter` gives it.

    Returns an int, a float (float32 precision), a bool (Go's ParseBool spellings: 1 t T TRUE true
    True and 0 f F FALSE false False) or, for `stop`, a one-item tuple. Raises InvalidOption with
    Ollama's texts: `unknown parameter 'x'`, `invalid int value [x]`, `invalid float value [x]`,
    `invalid bool value [x]`. Retired names are refused here too; a Modelfile parser that wants
    to warn about them must check DEPRECATED_OPTIONS first.
    """
    spec = OPTION_SPECS.get(name)
    if spec is None:
        if name in DEPRECATED_OPTIONS:
            raise InvalidOption(name, f"parameter '{name}' is deprecated and has no effect any more; remove it")
        raise InvalidOption(name, f"unknown parameter '{name}'")
    return spec.check(_from_text(spec, value))


def _from_text(spec: OptionSpec, value: str) -> OptionValue:
    name = spec.name
    if spec.kind is OptionKind.STRING_LIST:
        return (value,)
    if spec.kind is OptionKind.BOOL:
        if value in _GO_TRUE:
            return True
        if value in _GO_FALSE:
            return False
        raise InvalidOption(name, f"invalid bool value [{value}]")
    if spec.kind is OptionKind.INT:
        if _GO_INT.fullmatch(value):
            number = int(value)
            if _INT64_MIN <= number <= _INT64_MAX:
                return number
        raise InvalidOption(name, f"invalid int value [{value}]")
    single = _parse_go_float32(value)
    if single is None:
        raise InvalidOption(name, f"invalid float value [{value}]")
    return single


def _parse_go_float32(text: str) -> float | None:
    # Go would parse inf and nan too, but Ollama then fails to encode them as JSON, so a
    # non-finite value never reaches a model there either; here it is refused up front.
    if _GO_DECIMAL_FLOAT.fullmatch(text):
        number = float(text)
    elif _GO_HEX_FLOAT.fullmatch(text):
        number = float.fromhex(text)
    else:
        return None
    return _to_float32(number)


def _to_float32(number: float) -> float | None:
    """Round to float32 and return the shortest decimal that reads back as the same float32.

    This is the value Ollama writes into a model's params blob (Go encodes float32 that way), so
    `0.7` stays 0.7 rather than 0.699999988079071. None if the number is not a finite float32.
    """
    try:
        single = _round_trip_float32(number)
    except OverflowError:
        return None
    if not math.isfinite(single):
        return None
    for significant_digits in range(1, 10):
        candidate = float(f"{single:.{significant_digits - 1}e}")
        try:
            if _round_trip_float32(candidate) == single:
                return candidate
        except OverflowError:
            continue  # near the float32 maximum, rounding to few digits can land above it
    return single  # unreachable: 9 significant digits always identify a float32


def _round_trip_float32(number: float) -> float:
    value: float = struct.unpack("<f", struct.pack("<f", number))[0]
    return value


def format_parameter_value(value: OptionValue | str) -> str:
    """The text of one scalar value on a `PARAMETER` line: the inverse of `parse_parameter`.

    Ints in plain decimal (Ollama prints them through float64, so `num_ctx 1048576` came out as
    `1.048576e+06`, which its own parser then rejects), floats as Go's %v prints them, bools as
    true/false, strings as they are (quoting is the Modelfile renderer's business).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"a parameter value is a number, a bool or a string, not {type(value).__name__}")


def format_parameters(params: Mapping[str, object]) -> str:
    """`/api/show`'s `parameters` text: one line per value, key padded to 30 columns, Go %#v value.

    Keys are sorted (Ollama iterates a Go map, so its order is random); a list gives one line per
    item; strings are Go-quoted; numbers are printed as Go prints the float64 that Ollama decodes
    from the params blob, so large integers appear as e.g. `1.048576e+06`, as in Ollama. Lines are
    joined by newlines with no trailing newline; None values are left out.
    """
    lines: list[str] = []
    for name in sorted(params):
        value = params[name]
        if value is None:
            continue
        items: Iterable[object] = value if isinstance(value, (list, tuple)) else (value,)
        lines.extend(f"{name:<30} {_go_sharp_v(item)}" for item in items)
    return "\n".join(lines)


def _go_sharp_v(value: object) -> str:
    """Go's %#v of a JSON-decoded value: quoted strings, true/false, float64 numbers."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _go_quote(value)
    if isinstance(value, int):
        try:
            return _go_float(float(value))
        except OverflowError:
            return str(value)
    if isinstance(value, float):
        return _go_float(value)
    # Nothing else is stored by a valid create; show what there is rather than fail a /api/show.
    return _go_quote(str(value))


def _go_float(value: float) -> str:
    """Go's %v of a float64: shortest digits, exponent form below 1e-4 or from 1e6 up (`1e+06`)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return sign + "0"
    # repr gives the shortest round-tripping digits, as Go's shortest formatting does.
    mantissa, _, exponent_text = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    all_digits = whole + fraction
    significant = all_digits.lstrip("0")
    # `point`: where the decimal point sits, counted in digits from the first significant one.
    point = len(whole) + int(exponent_text or 0) - (len(all_digits) - len(significant))
    digits = significant.rstrip("0")
    exponent = point - 1
    if exponent < -4 or exponent >= 6:
        body = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{body}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def _go_quote(text: str) -> str:
    """Go's strconv.Quote: printable characters as they are, the rest escaped."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        elif char in _GO_ESCAPES:
            out.append(_GO_ESCAPES[char])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\\ufffd")  # a lone surrogate is not a valid rune; Go prints U+FFFD
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)
