"""Hypothesis strategies that make fuzzing requests for Berth's HTTP API.

Every endpoint has a valid baseline request; a generated case takes that baseline and replaces one
field (or one nested field: an option, a field of the first chat message) with a generated value,
of the field's own type at its edges or of every other JSON type, or mangles the whole body (not
JSON, an array, NaN literals, truncated, empty, a wrong content type, unknown fields...).

Requests stay cheap and local: generation is held to a few tokens unless the field being fuzzed is
the limit itself (such cases carry a `cap`, after which the harness hangs up); load-time options
(num_ctx, num_batch, num_thread, num_gpu...) are drawn rarely and from few values, since each new
value reloads the runner; pulls and pushes only ever name a registry on loopback (`Known.registry`,
a stub that answers 404 at once, or 127.0.0.1:1 where nothing listens); model names that a case
may create, overwrite or delete all start with `fuzz-` and the harness refuses to send one that
could touch the default model (see `run.py`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import quote, urlencode

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

DEFAULT_MODEL = "gemma3:270m"
DEAD_REGISTRY = "127.0.0.1:1"  # nothing listens there: a connection is refused at once (and retried)
FUZZ = "fuzz-"
HUGE_NESTING = 100_000


# -- cases -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """Facts about the live server that cases refer to."""

    registry: str  # host:port of a loopback stub registry that answers 404 to everything
    manifest_digest: str  # of the default model's manifest
    layer_digests: tuple[str, ...]  # its layers and config
    push_model: str  # a local model named on the stub registry, for pushes


@dataclass(frozen=True)
class Case:
    """One request to send, and what a right answer to it looks like."""

    endpoint: str
    method: str
    path: str
    api: str  # "ollama", "openai" or "oci": the shape its errors must have
    label: str  # what was changed from the baseline
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    chunked: bool = False  # send the body with Transfer-Encoding: chunked
    cap: float | None = None  # the request may legitimately run long: hang up after this many seconds
    wrong_type: bool = False  # a field was given a JSON type it does not take: a 2xx answer is a finding
    server_path: bool = False  # a create request naming a file on the server: success is a finding
    guard: str | None = None  # which safety check run.py applies before sending ("delete", "pull"...)

    def describe(self, limit: int = 500) -> str:
        text = f"{self.method} {self.path}  [{self.endpoint}: {self.label}]"
        extra = [f"{k}: {v}" for k, v in self.headers if k.lower() != "content-type" or v != "application/json"]
        if extra:
            text += "\n    headers: " + "; ".join(extra)[:200]
        if self.body is not None:
            shown = self.body[:limit].decode("utf-8", errors="backslashreplace")
            more = f" ... ({len(self.body)} bytes)" if len(self.body) > limit else ""
            text += f"\n    body: {shown}{more}"
        return text


@dataclass(frozen=True)
class RawJSON:
    """JSON text to splice into a body as it is: nesting too deep for `json.dumps`, NaN, 1e400..."""

    text: str
    kind: str  # its JSON type as fits() names it: "list", "obj", "int", "float", "invalid"
    note: str

    def __repr__(self) -> str:
        return self.note


def encode(doc: Any, ensure_ascii: bool = True) -> bytes:
    """`doc` as JSON (NaN and infinities as their non-JSON literals), RawJSON spliced in."""
    raws: dict[str, str] = {}

    def swap(value: Any) -> Any:
        if isinstance(value, RawJSON):
            key = f"\u0001raw{len(raws)}\u0001"
            raws[json.dumps(key)] = value.text
            return key
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(doc), allow_nan=True, ensure_ascii=ensure_ascii)
    for quoted, raw in raws.items():
        text = text.replace(quoted, raw, 1)
    return text.encode("utf-8", errors="surrogatepass")


def short(value: Any, limit: int = 80) -> str:
    """A value's repr for a case's label, cut short."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def json_kind(value: Any) -> str:
    if isinstance(value, RawJSON):
        return value.kind
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float" if math.isfinite(value) else "invalid"
    if isinstance(value, str):
        return "str"
    return "list" if isinstance(value, list) else "obj"


def fits(kind: str, value: Any, nullable: bool = True) -> bool:
    """Whether `value` has a JSON type the field takes. Kinds: str int num bool obj list any,
    str_list int_list obj_list, alternatives joined with `|`. An int is a num; a float is not an
    int; NaN and infinities fit nothing (they are not JSON)."""
    actual = json_kind(value)
    if actual == "null":
        return nullable
    if actual == "invalid":
        return False
    for wanted in kind.split("|"):
        if wanted == "any" or wanted == actual or (wanted == "num" and actual in ("int", "float")):
            return True
        if wanted.endswith("_list") and actual == "list" and not isinstance(value, RawJSON):
            item = wanted[: -len("_list")]
            if all(fits(item, v, nullable=False) for v in value):
                return True
    return False


def weighted(*pairs: tuple[int, SearchStrategy[Any]]) -> SearchStrategy[Any]:
    """One of the strategies, picked in proportion to its weight."""
    pool = [strategy for weight, strategy in pairs for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda s: s)


# -- values --------------------------------------------------------------------------------------------

CONTROL_CHARS = "".join(map(chr, range(32))) + "\x7f"

EDGE_STRINGS: tuple[str, ...] = (
    "", " ", "\x00", "a\x00b", "\n", "\r\n", "\t", CONTROL_CHARS, "\ud800", "\udfff", "a\udc80b", "\ufeff", "\u202e",
    "\uffff", "\U0010ffff", "𝕏", "😀" * 10, "é" * 50, "\u0301" * 100, "null", "true", "false", "0", "-1", "NaN",
    "{}", "[]", '{"a":1}', "{{ .Prompt }}", "{{", "<start_of_turn>user\n", "<end_of_turn>", "<eos>", "<bos>",
    "<unused0>", "%s%n%x%p", "../../../../etc/passwd", "/etc/passwd", "C:\\Windows\\win.ini", "\\", '"', "'",
    "${jndi:ldap://127.0.0.1:1/a}", "' OR 1=1 --", "<script>alert(1)</script>", "a" * 1024,
)
LONG_UNITS = ("A", "ab ", "é", "😀", "\x00", "<start_of_turn>", "{{", "9", "\ud800")

edge_strings = st.sampled_from(EDGE_STRINGS)
long_strings = st.builds(lambda unit, n: (unit * n)[:n], st.sampled_from(LONG_UNITS),
                         st.sampled_from([1_000, 10_000, 100_000]))
strings = weighted((4, edge_strings), (3, st.text(max_size=40)), (1, long_strings))
# For URL paths: httpx refuses URLs over 64 KiB, and a percent-encoded character takes up to 12 bytes.
path_strings = weighted((4, edge_strings), (3, st.text(max_size=40)),
                        (1, st.builds(lambda unit, n: unit * n, st.sampled_from(["a", "é", "%", "/"]), st.sampled_from([300, 4000]))))
short_strings = weighted((3, edge_strings.filter(lambda s: len(s) < 200)), (2, st.text(max_size=20)))

EDGE_INTS: tuple[int, ...] = (
    0, 1, -1, 2, 4, 255, 256, 65535, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**32, 2**53 + 1,
    2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30,
)
RAW_NUMBERS: tuple[RawJSON, ...] = (
    RawJSON("1" + "0" * 400, "int", "10**400"),
    RawJSON("1" + "0" * 5000, "int", "10**5000"),
    RawJSON("-0", "int", "-0"),
    RawJSON("1e400", "invalid", "1e400"),
    RawJSON("-1e400", "invalid", "-1e400"),
    RawJSON("1E2", "float", "1E2"),
    RawJSON("4.000000000000001", "float", "4.000000000000001"),
    RawJSON("NaN", "invalid", "NaN"),
    RawJSON("Infinity", "invalid", "Infinity"),
    RawJSON("-Infinity", "invalid", "-Infinity"),
)
ints = weighted((4, st.sampled_from(EDGE_INTS)), (2, st.integers(-1000, 1000)), (1, st.integers()),
                (1, st.sampled_from(RAW_NUMBERS)))
EDGE_FLOATS: tuple[float, ...] = (
    0.0, -0.0, 0.5, 1.0, -1.0, 1.5, 2.0, 1e-300, 5e-324, 1e38, 3.5e38, 1e308, -1e308, 2.0**63, float("nan"),
    float("inf"), float("-inf"),
)
floats = weighted((4, st.sampled_from(EDGE_FLOATS)), (2, st.floats(-10, 10)), (1, st.floats()), (2, ints))
bools = st.booleans()


def nested_array(levels: int) -> RawJSON:
    return RawJSON("[" * levels + "]" * levels, "list", f"<array nested {levels} levels>")


def nested_object(levels: int, leaf: str = "1") -> RawJSON:
    return RawJSON('{"a":' * levels + leaf + "}" * levels, "obj", f"<object nested {levels} levels>")


DEPTHS = (2, 10, 63, 64, 65, 100, 300, 1000)
deep_values = st.builds(lambda make, n: make(n), st.sampled_from([nested_array, nested_object]),
                        st.sampled_from(DEPTHS))
json_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
any_json = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
WRONG_SCALARS: tuple[Any, ...] = (
    "false", "true", "1", "0", "", "null", "yes", 0, 1, -1, 1.5, True, False, None, [], {}, [None], [1, "a"],
    ["a"], {"a": 1}, {"": None},
)
wrong_types = weighted((4, st.sampled_from(WRONG_SCALARS)), (2, deep_values), (2, any_json))


def typed_or_wrong(typed: SearchStrategy[Any], typed_weight: int = 3) -> SearchStrategy[Any]:
    return weighted((typed_weight, typed), (2, wrong_types))


# -- field-specific values -----------------------------------------------------------------------------

MODEL_NAMES: tuple[str, ...] = (
    DEFAULT_MODEL, "gemma3", "GEMMA3:270M", "registry.ollama.ai/library/gemma3:270m", "library/gemma3:270m",
    "gemma3:270m ", " gemma3:270m", "gemma3:270m\x00", "gemma3:", ":270m", "gemma3:270m:270m", "a/b/c/d/e",
    "../../../etc/passwd", "..", ".", "-", "_", "https://registry.ollama.ai/library/gemma3:270m",
    "http://127.0.0.1:1/library/x", "x" * 81, "x" * 10000, "gemma3@sha256:" + "0" * 64, "sha256:" + "0" * 64,
    "model with spaces", "ünïcode", "nonexistent-model:latest", "gemma3:270m/../x", "%2e%2e",
)
model_names = typed_or_wrong(weighted((3, st.sampled_from(MODEL_NAMES)), (1, strings)))

# Names a case may create, overwrite or delete: all start with fuzz- (or are empty).
FUZZ_NAMES: tuple[str, ...] = (
    "fuzz-a", "fuzz-a:latest", "FUZZ-A", "fuzz-a:" + "t" * 81, "fuzz-" + "x" * 81, "fuzz-/../../x", "fuzz-a\x00",
    "fuzz-a:b:c", "fuzz-a/b", "fuzz-ns/fuzz-m:t", "fuzz-.", "fuzz-ü", "fuzz- a", "fuzz-copy-0", "fuzz-copy-1",
)
fuzz_names = typed_or_wrong(weighted((3, st.sampled_from(FUZZ_NAMES)), (2, strings.map(lambda s: FUZZ + s)),
                                     (1, st.just(""))))

CONTEXTS: tuple[list[Any], ...] = (
    [], [0], [1, 2, 3], [2], [-1], [-(2**31)], [10**9], [262143], [262144], [2**31 - 1], [2**31], [2**63 - 1],
    [2**63], [2**64], [0] * 5000, list(range(100)), [1.5], ["1"], [None], [True], [[1]], [1, -1, 1],
)
contexts = typed_or_wrong(weighted((3, st.sampled_from(CONTEXTS)), (1, st.lists(ints, max_size=8))))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, pixels: bool = True) -> bytes:
    """A PNG whose header claims width x height; with `pixels`, a real 1-row image body follows."""
    head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if not pixels:
        return head
    return head + _png_chunk(b"IDAT", zlib.compress(b"\x00" + b"\xff\x00\x00" * min(width, 4))) + _png_chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


TINY_PNG = b64(png(1, 1))
HUGE_PNG = b64(png(65535, 65535, pixels=False))
IMAGE_VALUES: tuple[str, ...] = (
    TINY_PNG, HUGE_PNG, b64(png(0, 0)), b64(png(2**31 - 1, 1)), b64(png(16385, 16385)),
    b64(b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00" * 7),
    b64(b"BM" + b"\x00" * 16 + struct.pack("<ii", 65535, -65535) + b"\x00" * 28),
    b64(b"\xff\xd8\xff\xc0\x00\x11\x08" + struct.pack(">HH", 65535, 65535) + b"\x03" + b"\x00" * 9),
    "!!!not base64", "aGVsbG8=", "aGVsbG8", "", "====", "data:image/png;base64," + TINY_PNG, " " + TINY_PNG,
    TINY_PNG + "\n", "A" * 100_000,
)
image_lists = typed_or_wrong(weighted(
    (4, st.lists(st.sampled_from(IMAGE_VALUES), min_size=1, max_size=2)),
    (1, st.lists(st.binary(max_size=64).map(b64), min_size=1, max_size=3)),
    (1, st.lists(short_strings, max_size=2)),
    (1, st.sampled_from([[], [TINY_PNG] * 33, [HUGE_PNG] * 3])),
))

SCHEMAS: tuple[Any, ...] = (
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
    {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "null"}, {},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
    {"type": "string", "pattern": "^(a|b)*$"}, {"type": "string", "pattern": "(" * 1000},
    {"type": "string", "pattern": "\\"}, {"type": "string", "pattern": "[z-a]"}, {"type": "string", "pattern": "a{1000}"},
    {"type": "string", "pattern": "a{100000}"}, {"type": "string", "minLength": 100_000},
    {"type": "string", "maxLength": -1}, {"type": "array", "minItems": 100_000}, {"type": "integer", "minimum": 10**30},
    {"type": "number", "multipleOf": 0}, {"enum": []}, {"enum": [None, 1, "a", [1], {"a": 1}]}, {"const": "x"},
    {"$ref": "#"}, {"$ref": "#/definitions/x", "definitions": {"x": {"$ref": "#/definitions/x"}}},
    {"$ref": "http://127.0.0.1:1/schema.json"}, {"$ref": "file:///etc/passwd"}, {"$ref": "#/nope"},
    {"type": ["string", "null"]}, {"anyOf": []}, {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    {"allOf": [{"type": "string"}, {"type": "integer"}]}, {"not": {}}, {"type": "nonsense"}, {"properties": "x"},
    {"type": "object", "additionalProperties": {"$ref": "#"}}, {"type": "string", "format": "date-time"},
    {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(2000)}},
    {"type": "object", "required": ["missing"], "properties": {}}, {"type": "object", "properties": {"": {}}},
    {"items": [{"type": "string"}] * 100, "type": "array"}, {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
)


def nested_schema(levels: int) -> Any:
    if levels > 150:
        text = '{"type":"object","properties":{"a":' * levels + '{"type":"string"}' + "}}" * levels
        return RawJSON(text, "obj", f"<schema nested {levels} levels>")
    schema: Any = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


schemas = weighted((4, st.sampled_from(SCHEMAS)), (1, st.sampled_from([5, 20, 31, 32, 33, 64, 200]).map(nested_schema)),
                   (1, st.dictionaries(st.sampled_from(["type", "properties", "items", "enum", "pattern", "$ref",
                                                        "required", "minimum", "anyOf", "x-odd"]), any_json,
                                       max_size=4)))
formats = weighted((2, st.sampled_from(["json", "", "JSON", "xml", "garbage", " json", "null", "json\x00"])),
                   (4, schemas), (1, strings), (1, wrong_types))


def deep_templates(levels: int) -> list[str]:
    chain = "".join(f'{{{{define "t{i}"}}}}{{{{template "t{i + 1}" .}}}}{{{{end}}}}' for i in range(levels))
    return [
        "{{ if .Prompt }}" * levels + "x" + "{{ end }}" * levels,
        "{{ range .Messages }}" * levels + "{{ .Content }}" + "{{ end }}" * levels,
        "{{ with . }}" * levels + "{{ .Prompt }}" + "{{ end }}" * levels,
        "{{ " + "(" * levels + ".Prompt" + ")" * levels + " }}",
        "{{ .Prompt " + '| printf "%s" ' * levels + "}}",
        chain + f'{{{{define "t{levels}"}}}}x{{{{end}}}}{{{{template "t0" .}}}}',
        "{{ if .Prompt }}" * levels,
    ]


TEMPLATES: tuple[str, ...] = (
    "{{ .Prompt }}", "{{ .System }} {{ .Prompt }}", "", "{{", "}}", "{{ .Prompt", "{{ end }}", "{{ if }}",
    "{{ range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}", "{{ .Nonexistent.Field }}",
    "{{ index .Messages 999 }}", "{{ slice .Prompt 5 1 }}", '{{ printf "%d" }}', '{{ printf "%0999999d" 1 }}',
    '{{ printf "%02000000d" 1 }}', '{{ printf "%*d" 2000000 1 }}', '{{ printf "%.2000000f" 1.0 }}',
    '{{ define "a" }}{{ template "a" . }}{{ end }}{{ template "a" . }}', '{{ template "missing" }}',
    '{{ block "b" . }}x{{ end }}', "{{ call .Prompt }}", "{{ len 1 }}", "{{ and }}",
    '{{ $x := 1 }}{{ $x = "a" }}{{ $x }}', "{{/* unterminated", '{{ .Prompt | printf "%s" | printf "%q" }}',
    "{{ break }}", "{{ continue }}", "{{ range 1000000 }}{{ end }}", "{{ range $i, $e := 100 }}{{ $i }}{{ end }}",
    "{{ .Messages | len }}", "{{ json .Messages }}", "{{ toJson . }}", "{{ .Tools }}", "{{ currentDate }}",
    "\x00{{ .Prompt }}", '{{ "\\x00" }}', "{{ 1e400 }}", "{{ 99999999999999999999999 }}",
    "{{ -0x8000000000000000 }}", "{{ 'a' }}", "{{ `raw` }}", "{{ else }}", "{{ with $ }}{{ end }}", "{{ $ }}",
    "{{ (index .Messages 0).Content }}", "{{ .Response }}{{ .Suffix }}", "{{- .Prompt -}}", "{{ .Prompt }}" * 5000,
    "{{ html .Prompt }}{{ js .Prompt }}{{ urlquery .Prompt }}", "{{ eq 1 \"a\" }}", "{{ lt .Messages 1 }}",
    "{{ not }}", "{{ print nil }}", "{{ nil }}", "{{ .Prompt.Foo }}", "{{ index . \"Prompt\" }}",
)
templates = typed_or_wrong(weighted(
    (4, st.sampled_from(TEMPLATES)),
    (2, st.sampled_from([10, 64, 99, 100, 101, 1000, 5000]).flatmap(lambda n: st.sampled_from(deep_templates(n)))),
    (1, strings),
))

THINK_VALUES = (True, False, "low", "medium", "high", "max", "", "garbage", "LOW", 1, 0)
thinks = typed_or_wrong(st.sampled_from(THINK_VALUES))

KEEP_ALIVES: tuple[Any, ...] = (
    "5m", "0", 0, -1, "-1", "-1s", "1h", "1000000h", "garbage", "", "5", 5, 1.5, 1e308, 2**63, -(2**63), "PT5M",
    "5 m", "1d", "1ns", "9999999999999999999s", "-0s", "1e3s", "0x10s", True,
)
keep_alives = typed_or_wrong(st.sampled_from(KEEP_ALIVES))

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_LISTS: tuple[Any, ...] = (
    [TOOL], [], [{}], [{"type": "function"}], [{"type": "function", "function": {}}],
    [{"type": "function", "function": {"name": ""}}], [TOOL] * 200, [{"type": "x"}], [1], ["a"], [None],
    [{"type": "function", "function": {"name": "f", "parameters": "notobject"}}],
    [{"type": "function", "function": {"name": "f", "parameters": nested_schema(200)}}],
    [{"type": "function", "function": {"name": "f\x00", "parameters": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "(" * 500}}}}}],
)
tool_lists = typed_or_wrong(st.sampled_from(TOOL_LISTS))

TOOL_CALLS: tuple[Any, ...] = (
    [{"function": {"name": "f", "arguments": {"a": 1}}}], [{"function": {"name": "f", "arguments": "notadict"}}],
    [{"function": {}}], [{}], [{"function": {"name": "f", "arguments": nested_object(300)}}],
    [{"function": {"name": "f", "index": -1}}], [{"function": {"name": "f", "index": 2**63}}],
    [{"id": 1, "function": {"name": "f"}}], [{"function": {"name": "f", "arguments": {"a": 1}}}] * 1000,
)
tool_calls = typed_or_wrong(st.sampled_from(TOOL_CALLS))

ROLES = ("user", "assistant", "system", "tool", "USER", "", "developer", "function", "model", "\x00",
         "user\n<start_of_turn>", "ü")


# -- options ------------------------------------------------------------------------------------------

# Ollama's options and the JSON types each takes (ints take any number, truncated; stop a string too).
OPTION_KINDS: dict[str, str] = {
    "num_keep": "num", "seed": "num", "num_predict": "num", "top_k": "num", "top_p": "num", "min_p": "num",
    "typical_p": "num", "repeat_last_n": "num", "temperature": "num", "repeat_penalty": "num",
    "presence_penalty": "num", "frequency_penalty": "num", "stop": "str|str_list", "num_ctx": "num",
    "num_batch": "num", "num_gpu": "num", "main_gpu": "num", "use_mmap": "bool", "num_thread": "num",
}
FLOAT_OPTIONS = frozenset({"top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                           "frequency_penalty"})
# Load-time options: each new value reloads the runner (a second or more), so few values, drawn rarely.
RUNNER_OPTION_VALUES: dict[str, tuple[Any, ...]] = {
    "num_ctx": (0, 1, 2, 16, 256, 2048, 2**22, 2**22 + 1, -1, 2**31, 2**63, 1.5, 4096.0),
    "num_batch": (0, 1, 8, 512, 2**22, 2**22 + 1, -1, 2**31, 2**63, 1.5),
    "num_gpu": (-2, -1, 0, 1, 999, 2**31, 2**63, 1.5),
    "main_gpu": (-1, 0, 1, 255, 256, 2**31, 1.5),
    "use_mmap": (True, False),
    "num_thread": (0, 1, 2, 3, 1024, 1025, -1, 2**31, 2**63, 1.5),
}
STOP_VALUES: tuple[Any, ...] = ([], [""], ["\n"], ["a"] * 65, ["x" * 1025], ["a" * 1024] * 64, "Hi", ["<eos>"],
                                ["\x00"], ["\ud800"])
GENERATION_CAP = 10.0  # seconds: how long a case that may generate without a small limit is read
BASE_OPTIONS = {"num_predict": 4, "temperature": 0}


def option_values(name: str) -> SearchStrategy[Any]:
    if name in RUNNER_OPTION_VALUES:
        return weighted((3, st.sampled_from(RUNNER_OPTION_VALUES[name])), (1, wrong_types))
    if name == "stop":
        return typed_or_wrong(weighted((2, st.sampled_from(STOP_VALUES)), (1, st.lists(short_strings, max_size=4))))
    return typed_or_wrong(floats if name in FLOAT_OPTIONS else ints)


NON_RUNNER_OPTIONS = tuple(n for n in OPTION_KINDS if n not in RUNNER_OPTION_VALUES)
option_names = weighted((8, st.sampled_from(NON_RUNNER_OPTIONS)), (1, st.sampled_from(tuple(RUNNER_OPTION_VALUES))))
UNKNOWN_OPTIONS = ("mirostat", "tfs_z", "penalize_newline", "nonexistent", "", "num_predict ", "NUM_PREDICT",
                   "\x00", "draft_num_predict", "num_ctx\x00", "a" * 10000)


@dataclass(frozen=True)
class Mutation:
    """A change to a baseline document: its result, a label, and what a right answer is."""

    doc: Any
    label: str
    wrong_type: bool = False
    cap: float | None = None


def options_mutations(base_options: dict[str, Any], where: str = "options") -> SearchStrategy[Mutation]:
    """Mutations of an `options` object (also a create request's `parameters`)."""

    def one(name: str, value: Any) -> Mutation:
        options = {**base_options, name: value}
        return Mutation(options, f"{where}.{name} = {short(value)}",
                        wrong_type=not fits(OPTION_KINDS[name], value), cap=GENERATION_CAP if name == "num_predict" else None)

    def several(values: dict[str, Any]) -> Mutation:
        wrong = any(not fits(OPTION_KINDS[k], v) for k, v in values.items())
        cap = GENERATION_CAP if "num_predict" in values else None
        return Mutation({**base_options, **values}, f"{where} += {short(values, 200)}", wrong_type=wrong, cap=cap)

    def whole(value: Any) -> Mutation:
        if isinstance(value, dict) and "num_predict" not in value:
            value = {**value, "num_predict": 4}
        return Mutation(value, f"{where} = {short(value)}", wrong_type=not fits("obj", value))

    return weighted(
        (8, option_names.flatmap(lambda n: option_values(n).map(lambda v: one(n, v)))),
        (2, st.dictionaries(st.sampled_from(NON_RUNNER_OPTIONS), floats | ints, min_size=2, max_size=6).map(several)),
        (1, st.tuples(st.sampled_from(UNKNOWN_OPTIONS), any_json).map(
            lambda kv: Mutation({**base_options, kv[0]: kv[1]}, f"{where}.{short(kv[0], 30)} = {short(kv[1])}"))),
        (1, weighted((2, wrong_types), (1, st.dictionaries(st.text(max_size=8), any_json, max_size=4))).map(whole)),
    )


# -- endpoints -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # the JSON type(s) it takes, for fits(); "any" where the server takes any type
    values: SearchStrategy[Any]  # its typed edge values and wrong types
    weight: int = 2
    cap: float | None = None  # a case setting this field may run long
    nullable: bool = True

    def mutations(self, base: dict[str, Any]) -> SearchStrategy[Mutation]:
        def set_to(value: Any) -> Mutation:
            return Mutation({**base, self.name: value}, f"{self.name} = {short(value)}",
                            wrong_type=not fits(self.kind, value, self.nullable), cap=self.cap)

        return self.values.map(set_to)


NestedMutations = Callable[[dict[str, Any]], SearchStrategy[Mutation]]


@dataclass(frozen=True)
class JsonEndpoint:
    name: str
    method: str
    path: str
    api: str
    baseline: SearchStrategy[dict[str, Any]]
    fields: tuple[Field, ...]
    nested: tuple[tuple[int, NestedMutations], ...] = ()
    guard: str | None = None
    weight: int = 2
    cap: float | None = None  # for every case of this endpoint

    def case(self, label: str, body: bytes, *, headers: Iterable[tuple[str, str]] | None = None,
             wrong_type: bool = False, cap: float | None = None, chunked: bool = False,
             server_path: bool = False) -> Case:
        return Case(self.name, self.method, self.path, self.api, label, body,
                    tuple(headers) if headers is not None else Case.headers, chunked,
                    cap if cap is not None else self.cap, wrong_type, server_path, self.guard)

    def from_mutation(self, mutation: Mutation) -> Case:
        return self.case(mutation.label, encode(mutation.doc), wrong_type=mutation.wrong_type, cap=mutation.cap,
                         server_path=self.name == "create" and names_server_path(mutation.doc))

    def cases(self) -> SearchStrategy[Case]:
        def mutate(base: dict[str, Any]) -> SearchStrategy[Case]:
            choices: list[tuple[int, SearchStrategy[Mutation]]] = [(f.weight, f.mutations(base)) for f in self.fields]
            choices += [(weight, make(base)) for weight, make in self.nested]
            field_cases = weighted(*choices).map(self.from_mutation)
            return weighted((1, st.just(self.case("baseline", encode(base)))), (12, field_cases),
                            (3, whole_body_cases(self, base)))

        return self.baseline.flatmap(mutate)


def names_server_path(doc: Any) -> bool:
    """Whether a create request names a file on the server (which it must refuse). Which fields
    count follows the request's shape, as the server picks it: `from`/`files` when either is set,
    else the early-2024 `modelfile`/`path` shape (whose FROM and ADAPTER lines name the files)."""
    if not isinstance(doc, dict):
        return False

    def pathish(value: Any) -> bool:
        return isinstance(value, str) and (value.startswith(("/", "./", "../", "~", "file:")) or "/../" in value)

    if not doc.get("from") and not doc.get("files") and (doc.get("modelfile") is not None or doc.get("path")):
        modelfile = doc.get("modelfile")
        if not isinstance(modelfile, str):
            return bool(doc.get("path")) and modelfile is None
        for line in modelfile.splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) == 2 and parts[0].upper() in ("FROM", "ADAPTER") and pathish(parts[1].strip()):
                return True
        return False
    files = [v for key in ("files", "adapters") if isinstance(doc.get(key), dict) for v in doc[key].items()]
    if any(pathish(name) or pathish(value) or ".." in name for name, value in files):
        return True
    return pathish(doc.get("from"))


UNKNOWN_KEYS = ("zzz", "", "\x00", "__proto__", "constructor", "model ", "MODEL", "Model", "options\x00", "a" * 10000)
WRONG_CONTENT_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                       "application/xml", "", "application/json; charset=utf-16", "application/json; charset=latin-1",
                       "application/octet-stream", "*/*")
NOT_JSON = (b"hello", b"{", b"}", b"{]", b"\x00", b"\xff\xfe\xfd", b"model=gemma3", b"<xml/>", b"{'model': 'x'}",
            b'{"model": "a",}', b'{"model" "a"}', b"{,}", b'{"a":1}}', b"[", b'"unterminated', b"01", b"+1", b".5",
            b"tru", b"nul", b'{"\\uZZZZ":1}', b'{"a":"\\x41"}', b"/* c */ {}", b"{} // c")


def whole_body_cases(endpoint: JsonEndpoint, base: dict[str, Any]) -> SearchStrategy[Case]:
    text = encode(base)
    case = endpoint.case

    def truncated(at: int) -> Case:
        return case(f"body truncated to {at} of {len(text)} bytes", text[:at])

    def with_extra(kv: tuple[str, Any]) -> Case:
        return case(f"extra field {short(kv[0], 30)} = {short(kv[1])}", encode({**base, kv[0]: kv[1]}))

    def without(key: str) -> Case:
        return case(f"without {key}", encode({k: v for k, v in base.items() if k != key}))

    def content_type(kind: str) -> Case:
        return case(f"content-type {kind!r}", text, headers=[("content-type", kind)] if kind else [])

    def form() -> Case:
        flat = {k: v if isinstance(v, str) else json.dumps(v) for k, v in base.items()}
        return case("form-encoded body", urlencode(flat).encode(),
                    headers=[("content-type", "application/x-www-form-urlencoded")])

    def many_fields(n: int) -> Case:
        return case(f"{n} extra fields", encode({**base, **{f"k{i}": i for i in range(n)}}))

    fixed = [
        case("empty body", b""), case("whitespace body", b" \n\t "),
        case("JSON array of the body", b"[" + text + b"]"), case("JSON scalar 1", b"1"), case("JSON null", b"null"),
        case("JSON string", b'"x"'), case("JSON true", b"true"), case("JSON []", b"[]"), case("JSON {}", b"{}"),
        case("NaN literal field", text[:-1] + b',"zz":NaN}'), case("Infinity literal field", text[:-1] + b',"zz":Infinity}'),
        case("-Infinity literal field", text[:-1] + b',"zz":-Infinity}'),
        case("huge number literal", text[:-1] + b',"zz":1' + b"0" * 5000 + b"}"),
        case("1e400 literal", text[:-1] + b',"zz":1e400}'),
        case("trailing garbage", text + b"xyz"), case("two objects", text + text), case("BOM", b"\xef\xbb\xbf" + text),
        case("UTF-16", json.dumps(base).encode("utf-16")), case("invalid UTF-8 in a string", text[:-1] + b',"zz":"\xff\xfe"}'),
        case("raw lone surrogate", encode({**base, "zz": "\ud800"}, ensure_ascii=False)),
        case("duplicate key, wrong type first", b'{"' + next(iter(base)).encode() + b'":123,' + text[1:] if base else text),
        case("duplicate key, wrong type last", text[:-1] + b',"' + next(iter(base)).encode() + b'":[1]}' if base else text),
        case("chunked transfer", text, chunked=True), form(), case("nested 100,000 levels (array)", nested_array(HUGE_NESTING).text.encode()),
        case("field nested 100,000 levels", text[:-1] + b',"zz":' + nested_array(HUGE_NESTING).text.encode() + b"}"),
        many_fields(1000),
    ]
    return weighted(
        (6, st.sampled_from(fixed)),
        (2, st.sampled_from(NOT_JSON).map(lambda raw: case(f"not JSON {short(raw, 30)}", raw))),
        (1, st.binary(max_size=256).map(lambda raw: case("random bytes", raw))),
        (2, st.integers(0, max(len(text) - 1, 0)).map(truncated)),
        (2, st.tuples(st.sampled_from(UNKNOWN_KEYS), weighted((2, any_json), (1, deep_values))).map(with_extra)),
        (1, st.sampled_from(list(base) or [""]).map(without)),
        (2, st.sampled_from(WRONG_CONTENT_TYPES).map(content_type)),
        (1, st.just(None).map(lambda _: many_fields(100_000))),
    )


def _stream_field() -> SearchStrategy[dict[str, Any]]:
    return st.sampled_from([{}, {"stream": True}, {"stream": False}])


def _with(base: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda extra: {**base, **extra}


PROMPTS = ("Hi", "Say yes.", "1+1=")
strict_bool = typed_or_wrong(bools)


def _inference_fields(prompt_field: str | None) -> list[Field]:
    fields = [
        Field("model", "str", model_names), Field("name", "str", model_names, weight=1),
        Field("keep_alive", "any", keep_alives, weight=1), Field("stream", "bool", strict_bool),
    ]
    if prompt_field:
        fields.append(Field(prompt_field, "str", typed_or_wrong(strings), weight=3))
    return fields


def _generation_fields() -> list[Field]:
    return [
        Field("format", "any", formats, weight=3), Field("think", "bool|str", thinks),
        Field("template", "str", templates, weight=3), Field("truncate", "bool", strict_bool, weight=1),
        Field("shift", "bool", strict_bool, weight=1), Field("logprobs", "bool", strict_bool, weight=1),
        Field("top_logprobs", "int", typed_or_wrong(ints), weight=1),
        Field("_debug_render_only", "bool", strict_bool, weight=1),
    ]


def _options_nested(weight: int = 8) -> tuple[int, NestedMutations]:
    def make(base: dict[str, Any]) -> SearchStrategy[Mutation]:
        options = base.get("options") if isinstance(base.get("options"), dict) else {}
        return options_mutations(options).map(
            lambda m: replace(m, doc={**base, "options": m.doc}))

    return weight, make


def generate_endpoint() -> JsonEndpoint:
    baseline = st.builds(lambda p, s: {"model": DEFAULT_MODEL, "prompt": p, "options": dict(BASE_OPTIONS), **s},
                         st.sampled_from(PROMPTS), _stream_field())
    fields = _inference_fields("prompt") + _generation_fields() + [
        Field("suffix", "str", typed_or_wrong(strings), weight=1), Field("system", "str", typed_or_wrong(strings)),
        Field("context", "int_list", contexts, weight=3), Field("raw", "bool", strict_bool),
        Field("images", "str_list", image_lists, weight=2),
    ]
    return JsonEndpoint("generate", "POST", "/api/generate", "ollama", baseline, tuple(fields), (_options_nested(),),
                        weight=14)


def _message_nested(weight: int = 6) -> tuple[int, NestedMutations]:
    message_fields = (
        Field("role", "str", typed_or_wrong(weighted((2, st.sampled_from(ROLES)), (1, strings))), nullable=False),
        Field("content", "str", typed_or_wrong(strings), weight=3), Field("images", "str_list", image_lists),
        Field("tool_calls", "obj_list", tool_calls), Field("tool_name", "str", typed_or_wrong(short_strings), weight=1),
        Field("tool_call_id", "str", typed_or_wrong(short_strings), weight=1),
        Field("thinking", "str", typed_or_wrong(strings), weight=1),
    )

    def make(base: dict[str, Any]) -> SearchStrategy[Mutation]:
        first = base["messages"][0]
        chosen = weighted(*[(f.weight, f.mutations(first)) for f in message_fields])
        return chosen.map(lambda m: replace(m, doc={**base, "messages": [m.doc, *base["messages"][1:]]},
                                            label=f"messages.0.{m.label}"))

    return weight, make


MESSAGE_LISTS: tuple[Any, ...] = (
    [], [{}], [{"role": "user"}], [{"content": "hi"}], [{"role": "user", "content": "hi"}] * 500,
    [{"role": "system", "content": "x"}], [{"role": "assistant", "content": "x"}], [{"role": "tool", "content": "x"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], ["hi"], [None], [[]], [1],
    [{"role": "user", "content": "hi", "images": [HUGE_PNG]}], [{"role": "user", "content": "x" * 100_000}],
)


def chat_endpoint() -> JsonEndpoint:
    baseline = st.builds(lambda p, s: {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": p}],
                                       "options": dict(BASE_OPTIONS), **s},
                         st.sampled_from(PROMPTS), _stream_field())
    fields = _inference_fields(None) + _generation_fields() + [
        Field("messages", "obj_list", typed_or_wrong(st.sampled_from(MESSAGE_LISTS))),
        Field("tools", "obj_list", tool_lists),
    ]
    return JsonEndpoint("chat", "POST", "/api/chat", "ollama", baseline, tuple(fields),
                        (_options_nested(), _message_nested()), weight=14)


EMBED_INPUTS: tuple[Any, ...] = ("hi", ["a", "b"], [], "", [""], ["hi"] * 200, [1, 2], [[1, 2]], [None], "x" * 100_000,
                                 ["\ud800"], ["\x00"])


def embed_endpoint() -> JsonEndpoint:
    baseline = st.just({"model": DEFAULT_MODEL, "input": "hi"})
    fields = _inference_fields(None) + [
        Field("input", "str|str_list", typed_or_wrong(weighted((3, st.sampled_from(EMBED_INPUTS)), (1, strings))),
              weight=4),
        Field("truncate", "bool", strict_bool), Field("dimensions", "int", typed_or_wrong(ints), weight=3),
    ]
    return JsonEndpoint("embed", "POST", "/api/embed", "ollama", baseline, tuple(fields), (_options_nested(3),),
                        weight=4)


def embeddings_endpoint() -> JsonEndpoint:
    baseline = st.just({"model": DEFAULT_MODEL, "prompt": "hi"})
    return JsonEndpoint("embeddings", "POST", "/api/embeddings", "ollama", baseline,
                        tuple(_inference_fields("prompt")), (_options_nested(3),), weight=3)


# -- model management ----------------------------------------------------------------------------------


def show_endpoint() -> JsonEndpoint:
    baseline = st.sampled_from([{"model": DEFAULT_MODEL}, {"name": DEFAULT_MODEL}, {"model": DEFAULT_MODEL, "verbose": True}])
    fields = (Field("model", "str", model_names, weight=4), Field("name", "str", model_names),
              Field("verbose", "bool", strict_bool))
    return JsonEndpoint("show", "POST", "/api/show", "ollama", baseline, fields, weight=6)


def copy_endpoint() -> JsonEndpoint:
    baseline = st.integers(0, 3).map(lambda n: {"source": DEFAULT_MODEL, "destination": f"fuzz-copy-{n}"})
    fields = (Field("source", "str", model_names, weight=3), Field("destination", "str", fuzz_names, weight=3))
    return JsonEndpoint("copy", "POST", "/api/copy", "ollama", baseline, fields, guard="copy", weight=4)


def delete_endpoint() -> JsonEndpoint:
    baseline = st.integers(0, 3).map(lambda n: {"model": f"fuzz-copy-{n}"})
    fields = (Field("model", "str", fuzz_names, weight=3), Field("name", "str", fuzz_names))
    return JsonEndpoint("delete", "DELETE", "/api/delete", "ollama", baseline, fields, guard="delete", weight=4)


MODELFILES: tuple[str, ...] = (
    "FROM /etc/passwd", "FROM ../../etc/passwd", "FROM ~/.ssh/id_rsa", "FROM ./model.gguf", "FROM file:///etc/passwd",
    f"FROM {DEFAULT_MODEL}\nADAPTER /etc/passwd", f"FROM {DEFAULT_MODEL}\nSYSTEM hi\nPARAMETER num_predict 4",
    f"FROM {DEFAULT_MODEL}\nPARAMETER num_ctx abc", f"FROM {DEFAULT_MODEL}\nPARAMETER nonexistent 1",
    f"FROM {DEFAULT_MODEL}\nPARAMETER stop", f'FROM {DEFAULT_MODEL}\nTEMPLATE """{{{{ .Prompt"""',
    f'FROM {DEFAULT_MODEL}\nTEMPLATE """' + deep_templates(1000)[0] + '"""', "FROM @sha256:" + "0" * 64,
    "FROM @sha256:xyz", "FROM @/etc/passwd", "FROM", "", "\x00", "FROM " + "x" * 100_000, "# only a comment",
    f"FROM {DEFAULT_MODEL}\nMESSAGE user", f"FROM {DEFAULT_MODEL}\nMESSAGE nobody hi", f"FROM {DEFAULT_MODEL}\nLICENSE \"\"\"",
    f"FROM {DEFAULT_MODEL}\n" + "PARAMETER stop x\n" * 100, f"FROM {DEFAULT_MODEL}\nREQUIRES 999.0.0",
    "FROM " + DEFAULT_MODEL + "\nFROM " + DEFAULT_MODEL,
)
BAD_DIGESTS = ("sha256:" + "0" * 64, "sha256:" + "A" * 64, "sha256:" + "0" * 63, "sha256:" + "0" * 65, "sha256:",
               "sha256:xyz", "sha512:" + "0" * 128, "md5:d41d8cd98f00b204e9800998ecf8427e", "/etc/passwd",
               "../../etc/passwd", "file:///etc/passwd", "", "sha256-" + "0" * 64, "sha256:../../../../etc/passwd")


def create_endpoint(known: Known) -> JsonEndpoint:
    weights = known.layer_digests[0] if known.layer_digests else "sha256:" + "0" * 64

    def from_model(n: int, s: dict[str, Any]) -> dict[str, Any]:
        return {"model": f"fuzz-create-{n}", "from": DEFAULT_MODEL, "system": "Be brief.",
                "parameters": {"num_predict": 4}, **s}

    baseline = weighted(
        (4, st.builds(from_model, st.integers(0, 3), _stream_field())),
        (1, st.integers(0, 3).map(lambda n: {"model": f"fuzz-create-{n}", "stream": False,
                                             "modelfile": f"FROM {DEFAULT_MODEL}\nPARAMETER num_predict 4"})),
        (1, st.integers(0, 3).map(lambda n: {"model": f"fuzz-create-{n}", "files": {"model.gguf": weights},
                                             "stream": False})),
    )
    digests = st.sampled_from(BAD_DIGESTS + tuple(known.layer_digests))
    file_maps = typed_or_wrong(weighted(
        (3, st.sampled_from([{"m.gguf": "/etc/passwd"}, {"m.gguf": "/etc/shadow"}, {"../../etc/passwd": weights},
                             {"/etc/passwd": weights}, {"": ""}, {"m.gguf": weights, "n.gguf": weights},
                             {f"{i}.gguf": weights for i in range(1000)}, {"m.gguf\x00": weights},
                             {"model.safetensors": weights}, {"config.json": weights}, {"m.gguf": "file:///etc/passwd"},
                             {"m.gguf": "~/.ssh/id_rsa"}])),
        (2, st.dictionaries(short_strings, digests, min_size=1, max_size=2)),
    ))
    parameters = weighted(
        (3, options_mutations({"num_predict": 4}, "parameters").map(lambda m: m.doc)),
        (1, wrong_types),
    )
    fields = (
        Field("model", "str", fuzz_names), Field("name", "str", fuzz_names, weight=1),
        Field("from", "str", typed_or_wrong(weighted((3, st.sampled_from(MODEL_NAMES + (
            "/etc/passwd", "../../etc/passwd", "~/.ssh/id_rsa", "file:///etc/passwd", "./m.gguf", "@sha256:" + "0" * 64,
            weights, "@" + weights))), (1, strings))), weight=3),
        Field("files", "obj", file_maps, weight=3), Field("adapters", "obj", file_maps),
        Field("template", "str", templates, weight=3), Field("system", "str", typed_or_wrong(strings)),
        Field("license", "str|str_list", typed_or_wrong(weighted((2, strings), (1, st.lists(short_strings, max_size=3))))),
        Field("parameters", "obj", parameters, weight=3),
        Field("messages", "obj_list", typed_or_wrong(st.sampled_from(MESSAGE_LISTS))),
        Field("requires", "str", typed_or_wrong(st.sampled_from(["0.1.0", "999.0.0", "garbage", "", "0.0.0", "v1", "1" * 1000]))),
        Field("quantize", "str", typed_or_wrong(st.sampled_from(["q4_K_M", "Q8_0", "", "garbage"])), weight=1),
        Field("quantization", "str", typed_or_wrong(st.sampled_from(["q4_K_M", ""])), weight=1),
        Field("modelfile", "str", typed_or_wrong(weighted((3, st.sampled_from(MODELFILES)), (1, strings))), weight=3),
        Field("path", "str", typed_or_wrong(st.sampled_from(["/etc/shadow", "/etc/passwd", "", "Modelfile",
                                                             "../../etc/passwd", "~/.bashrc", "/dev/zero", "/proc/self/environ"]))),
        Field("stream", "bool", strict_bool),
    )
    return JsonEndpoint("create", "POST", "/api/create", "ollama", baseline, fields, guard="create", weight=6)


def registry_names(known: Known) -> SearchStrategy[Any]:
    hosts = (known.registry, DEAD_REGISTRY)
    fixed = [f"{known.registry}/library/fuzz:latest", f"{known.registry}/fuzz", f"http://{known.registry}/library/fuzz",
             f"https://{known.registry}/library/fuzz", f"{known.registry}/a/b/c/d", f"{known.registry}/library/fuzz:" + "t" * 81,
             known.push_model, f"{known.registry}/library/fuzz@sha256:" + "0" * 64, f"{known.registry}/library/fuzz:../x",
             f"{known.registry}/library/" + "x" * 81, f"{known.registry}/Library/FUZZ:Latest"]
    generated = st.tuples(st.sampled_from(hosts[:1]), st.sampled_from(["/library/", "/"]), short_strings).map("".join)
    return typed_or_wrong(weighted((3, st.sampled_from(fixed)), (1, generated)))


# A pull or push with insecure other than true goes to https on the stub (or to a closed port):
# the connection fails and is retried with back-off, so such cases are read for a few seconds only.
SLOW_TRANSFER_CAP = 4.0


def _transfer_fields(known: Known) -> list[Field]:
    rates = typed_or_wrong(weighted((2, st.sampled_from(["50M", "1K", "0", "", "-1", "1.5M", "10G", "abc", "9" * 30,
                                                         "1e3", " 5M", "5MB", "5 M", "\x00"])), (1, ints)))
    return [
        Field("model", "str", registry_names(known), weight=3), Field("name", "str", registry_names(known)),
        Field("insecure", "bool", typed_or_wrong(bools), cap=SLOW_TRANSFER_CAP), Field("stream", "bool", strict_bool),
        Field("max_rate", "int|str", rates), Field("username", "any", typed_or_wrong(short_strings), weight=1),
        Field("password", "any", typed_or_wrong(short_strings), weight=1),
    ]


def pull_endpoint(known: Known) -> JsonEndpoint:
    baseline = _stream_field().map(lambda s: {"model": f"{known.registry}/library/fuzz:latest", "insecure": True, **s})
    return JsonEndpoint("pull", "POST", "/api/pull", "ollama", baseline, tuple(_transfer_fields(known)), guard="transfer",
                        weight=3)


def push_endpoint(known: Known) -> JsonEndpoint:
    baseline = _stream_field().map(lambda s: {"model": known.push_model, "insecure": True, "sign": False, **s})
    fields = _transfer_fields(known) + [
        Field("oci", "bool", strict_bool),
        # `sign: true` would make the server user's signing key if there is none: never sent.
        Field("sign", "bool", weighted((1, st.just(False)), (3, wrong_types.filter(lambda v: v is not True)))),
    ]
    return JsonEndpoint("push", "POST", "/api/push", "ollama", baseline, tuple(fields), guard="transfer", weight=3)


SCOPES = ("read", "write", "admin", "", "ADMIN", "root", "read,write", "admin ", "\x00", "*")


def keys_create_endpoint() -> JsonEndpoint:
    baseline = st.builds(lambda n, s: {"name": f"fuzz-key-{n}", "scope": s}, st.integers(0, 5),
                         st.sampled_from(("read", "write", "admin")))
    fields = (Field("name", "str", fuzz_names, weight=3, nullable=False),
              Field("scope", "str", typed_or_wrong(weighted((2, st.sampled_from(SCOPES)), (1, short_strings))), weight=3))
    return JsonEndpoint("keys-create", "POST", "/api/keys", "ollama", baseline, fields, weight=3)


def keys_revoke_endpoint() -> JsonEndpoint:
    baseline = st.integers(0, 5).map(lambda n: {"name": f"fuzz-key-{n}"})
    fields = (Field("name", "str", fuzz_names, weight=3, nullable=False),)
    return JsonEndpoint("keys-revoke", "DELETE", "/api/keys", "ollama", baseline, fields, guard="keys", weight=3)


# -- OpenAI --------------------------------------------------------------------------------------------

CONTENT_PARTS: tuple[Any, ...] = (
    [{"type": "text", "text": "hi"}], [{"type": "text"}], [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + TINY_PNG}}],
    [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + HUGE_PNG}}],
    [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}],
    [{"type": "image_url", "image_url": "data:image/png;base64," + TINY_PNG}],
    [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}],
    [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], [{"type": "input_audio", "input_audio": {}}],
    [{"type": "nonsense"}], [{}], [None], ["hi"], [{"type": "text", "text": "x"}] * 1000, [],
)
OPENAI_MESSAGE_LISTS: tuple[Any, ...] = MESSAGE_LISTS + (
    [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
    [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{bad json"}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "x"}],
    [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": nested_object(300)}}]}],
    [{"role": "user", "content": None}], [{"role": "user", "name": "x" * 10000, "content": "hi"}],
)
RESPONSE_FORMATS: tuple[Any, ...] = (
    {"type": "json_object"}, {"type": "text"}, {"type": "garbage"}, {"type": "json_schema"}, {"type": ""}, {},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[0]}},
    {"type": "json_schema", "json_schema": {"schema": nested_schema(200)}},
    {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(" * 1000}}},
    {"type": "json_schema", "json_schema": {"schema": "notobject"}}, {"type": "JSON_OBJECT"}, {"type": 1},
)


def _sampled_fields() -> list[Field]:
    return [
        Field("model", "str", model_names), Field("stream", "bool", strict_bool),
        Field("stream_options", "obj", typed_or_wrong(st.sampled_from([{"include_usage": True}, {}, {"include_usage": "yes"},
                                                                     {"include_usage": None}])), weight=1),
        Field("max_tokens", "int", typed_or_wrong(ints), cap=GENERATION_CAP),
        Field("temperature", "num", typed_or_wrong(floats)), Field("top_p", "num", typed_or_wrong(floats)),
        Field("seed", "int", typed_or_wrong(ints)), Field("frequency_penalty", "num", typed_or_wrong(floats), weight=1),
        Field("presence_penalty", "num", typed_or_wrong(floats), weight=1),
        Field("stop", "str|str_list", typed_or_wrong(st.sampled_from(STOP_VALUES))),
        Field("n", "any", typed_or_wrong(ints), weight=1), Field("user", "any", typed_or_wrong(short_strings), weight=1),
        Field("logit_bias", "any", typed_or_wrong(st.sampled_from([{"1": 100}, {"-1": -100}, {"x": 1e308}])), weight=1),
    ]


def openai_chat_endpoint() -> JsonEndpoint:
    baseline = st.builds(lambda p, s: {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": p}],
                                       "max_tokens": 4, "temperature": 0, **s},
                         st.sampled_from(PROMPTS), _stream_field())
    content = typed_or_wrong(weighted((2, strings), (2, st.sampled_from(CONTENT_PARTS))))
    fields = _sampled_fields() + [
        Field("messages", "obj_list", typed_or_wrong(st.sampled_from(OPENAI_MESSAGE_LISTS)), weight=3),
        Field("max_completion_tokens", "int", typed_or_wrong(ints), cap=GENERATION_CAP),
        Field("response_format", "obj", typed_or_wrong(st.sampled_from(RESPONSE_FORMATS))),
        Field("tools", "obj_list", tool_lists),
        Field("reasoning_effort", "str", typed_or_wrong(st.sampled_from(["none", "low", "high", "max", "", "garbage"]))),
        Field("reasoning", "obj", typed_or_wrong(st.sampled_from([{"effort": "low"}, {"effort": "bad"}, {"effort": 1}, {}])), weight=1),
        Field("logprobs", "bool", strict_bool, weight=1), Field("top_logprobs", "int", typed_or_wrong(ints), weight=1),
        Field("tool_choice", "any", typed_or_wrong(st.sampled_from(["auto", "none", "required", {"type": "function"}])), weight=1),
    ]

    def content_mutation(base: dict[str, Any]) -> SearchStrategy[Mutation]:
        return content.map(lambda v: Mutation({**base, "messages": [{"role": "user", "content": v}]},
                                              f"messages.0.content = {short(v)}", wrong_type=not fits("str|list", v)))

    return JsonEndpoint("v1-chat", "POST", "/v1/chat/completions", "openai", baseline, tuple(fields),
                        ((4, content_mutation),), weight=10)


COMPLETION_PROMPTS: tuple[Any, ...] = ("hi", ["a", "b"], [], "", [1, 2, 3], [[1, 2]], [-1], [10**9], [None], [""],
                                       ["x"] * 100, "x" * 100_000)


def openai_completions_endpoint() -> JsonEndpoint:
    baseline = st.builds(lambda p, s: {"model": DEFAULT_MODEL, "prompt": p, "max_tokens": 4, "temperature": 0, **s},
                         st.sampled_from(PROMPTS), _stream_field())
    fields = _sampled_fields() + [
        Field("prompt", "any", typed_or_wrong(weighted((2, st.sampled_from(COMPLETION_PROMPTS)), (1, strings))), weight=4),
        Field("suffix", "str", typed_or_wrong(short_strings)), Field("echo", "any", typed_or_wrong(bools), weight=1),
        Field("best_of", "any", typed_or_wrong(ints), weight=1),
    ]
    return JsonEndpoint("v1-completions", "POST", "/v1/completions", "openai", baseline, tuple(fields), weight=8)


def openai_embeddings_endpoint() -> JsonEndpoint:
    baseline = st.just({"model": DEFAULT_MODEL, "input": "hi"})
    fields = (
        Field("model", "str", model_names),
        Field("input", "any", typed_or_wrong(weighted((3, st.sampled_from(EMBED_INPUTS)), (1, strings))), weight=4),
        Field("dimensions", "int", typed_or_wrong(ints), weight=2),
        Field("encoding_format", "str", typed_or_wrong(st.sampled_from(["float", "base64", "", "garbage", "FLOAT"]))),
    )
    return JsonEndpoint("v1-embeddings", "POST", "/v1/embeddings", "openai", baseline, fields, weight=3)


# -- requests without JSON bodies: blobs, OCI, listings -------------------------------------------------


def _segment(text: str) -> str:
    return quote(text, safe="", errors="surrogatepass")


def blob_cases(known: Known) -> SearchStrategy[Case]:
    real = known.layer_digests

    def digest_for(data: bytes, how: str) -> str:
        good = "sha256:" + hashlib.sha256(data).hexdigest()
        return {"match": good, "mismatch": "sha256:" + hashlib.sha256(data + b"x").hexdigest(),
                "upper": good.upper(), "upper-hex": "sha256:" + good[7:].upper(), "known": real[0] if real else good,
                }.get(how, how)

    def post(data: bytes, how: str, query: str) -> Case:
        digest = digest_for(data, how)
        return Case("blob-upload", "POST", f"/api/blobs/{quote(digest, safe=':', errors='surrogatepass')}{query}", "ollama",
                    f"upload {len(data)} bytes as {how}{query}", data, (("content-type", "application/octet-stream"),))

    def head(digest: str) -> Case:
        return Case("blob-head", "HEAD", f"/api/blobs/{quote(digest, safe=':', errors='surrogatepass')}", "ollama", f"head {short(digest)}")

    data = weighted((3, st.binary(max_size=2048)), (1, st.sampled_from([b"", b"\x00" * 65536])))
    hows = st.sampled_from(("match", "match", "mismatch", "upper", "upper-hex", "known") + BAD_DIGESTS)
    queries = st.sampled_from(["", "", "", "?path=/etc/passwd", "?path=", "?x=1", "?path=" + quote("../../etc/passwd")])
    heads = weighted((2, st.sampled_from(BAD_DIGESTS + tuple(real))), (1, path_strings),
                     (1, st.binary(min_size=1, max_size=32).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest())))
    return weighted((3, st.builds(post, data, hows, queries)), (2, heads.map(head)))


RANGES = (None, "bytes=0-0", "bytes=0-10", "bytes=-1", "bytes=-0", "bytes=10-", "bytes=0-", "bytes=", "bytes=5-1",
          "bytes=0-1,2-3", "bytes=99999999999999999999-", "bytes=0-99999999999999999999999", "bytes=-99999999999999999999",
          "items=0-1", "bytes= 0-1", "bytes=1-0", "bytes=--1", "bytes=0-1 ", "bytes=" + "9" * 5000 + "-")
REPOS = ("library/gemma3", "library/GEMMA3", "library/nonexistent", "gemma3", "a/b/c", "library/gemma3/extra",
         "library/..", "../library/gemma3", "library/gemma3%00", "library/%2e%2e", "%2e%2e/%2e%2e", "library/" + "x" * 81,
         "registry.ollama.ai/library/gemma3", "library/gemma3%20", "library//gemma3", "_/_", "library/gemma3%2Fx")


def oci_cases(known: Known) -> SearchStrategy[Case]:
    repos = weighted((4, st.sampled_from(REPOS)), (1, path_strings.map(_segment)),
                     (1, st.tuples(path_strings, path_strings).map(lambda t: _segment(t[0]) + "/" + _segment(t[1]))))
    refs = weighted((4, st.sampled_from(("270m", "270M", "latest", "sha256:" + known.manifest_digest.split(":")[-1],
                                         "sha256:" + "0" * 64, "sha256:", "sha256:xyz", "sha512:" + "0" * 128, "md5:abc",
                                         "x" * 1000, "..", "%00", "sha256:" + "0" * 64 + "%00"))),
                    (1, path_strings.map(_segment)))
    digests = weighted((4, st.sampled_from(tuple(known.layer_digests) + BAD_DIGESTS[:8])), (1, path_strings.map(_segment)))
    methods = st.sampled_from(["GET", "GET", "HEAD"])

    def oci(method: str, path: str, label: str, headers: Sequence[tuple[str, str]] = ()) -> Case:
        return Case("oci", method, path, "oci", label, None, tuple(headers))

    def manifest(method: str, repo: str, ref: str, accept: str | None) -> Case:
        headers = [("accept", accept)] if accept is not None else []
        return oci(method, f"/v2/{repo}/manifests/{ref}", f"manifest {short(repo, 40)} {short(ref, 40)}", headers)

    def blob(method: str, repo: str, digest: str, range_: str | None) -> Case:
        headers = [("range", range_)] if range_ is not None else []
        return oci(method, f"/v2/{repo}/blobs/{digest}", f"blob {short(repo, 40)} {short(digest, 40)} range={short(range_, 40)}",
                   headers)

    accepts = st.sampled_from([None, "application/vnd.oci.image.manifest.v1+json",
                               "application/vnd.docker.distribution.manifest.v2+json", "*/*", "text/html", ""])
    catalog_queries = st.sampled_from(["", "?n=1", "?n=-1", "?n=0", "?n=abc", "?n=99999999999999999999", "?last=zzz",
                                       "?n=1&last=library%2Fgemma3"])
    return weighted(
        (1, methods.map(lambda m: oci(m, "/v2/", "version check"))),
        (1, catalog_queries.map(lambda q: oci("GET", f"/v2/_catalog{q}", f"catalog {q}"))),
        (2, repos.map(lambda r: oci("GET", f"/v2/{r}/tags/list", f"tags {short(r, 40)}"))),
        (3, st.builds(manifest, methods, repos, refs, accepts)),
        (3, st.builds(blob, methods, repos, digests, st.sampled_from(RANGES))),
    )


def listing_cases() -> SearchStrategy[Case]:
    fixed = [Case("list", "GET", path, api, f"GET {path}") for path, api in (
        ("/api/tags", "ollama"), ("/api/ps", "ollama"), ("/api/version", "ollama"), ("/api/keys", "ollama"),
        ("/v1/models", "openai"), ("/", "ollama"))]
    model = weighted((2, st.sampled_from(MODEL_NAMES)), (1, path_strings)).map(
        lambda m: Case("v1-model", "GET", "/v1/models/" + quote(m, safe=":/", errors="surrogatepass"), "openai", f"model {short(m)}"))
    return weighted((1, st.sampled_from(fixed)), (2, model))


# -- everything ----------------------------------------------------------------------------------------


def json_endpoints(known: Known) -> list[JsonEndpoint]:
    return [generate_endpoint(), chat_endpoint(), embed_endpoint(), embeddings_endpoint(), show_endpoint(),
            copy_endpoint(), delete_endpoint(), create_endpoint(known), pull_endpoint(known), push_endpoint(known),
            keys_create_endpoint(), keys_revoke_endpoint(), openai_chat_endpoint(), openai_completions_endpoint(),
            openai_embeddings_endpoint()]


def cases(known: Known) -> SearchStrategy[Case]:
    """Any fuzzing case, endpoints in proportion to their weights."""
    pairs: list[tuple[int, SearchStrategy[Case]]] = [(e.weight, e.cases()) for e in json_endpoints(known)]
    # Requests that cost the server next to nothing are drawn more often than their share of time.
    pairs += [(8, blob_cases(known)), (14, oci_cases(known)), (3, listing_cases())]
    return weighted(*pairs)


# -- explicit cases: sent once, first, every run --------------------------------------------------------


def explicit_cases(known: Known) -> list[Case]:
    """The cases each run must include whatever the random draw: the deepest nesting, paths on the
    server, out-of-vocabulary context, mistyped `stream`, deep templates, huge images."""
    out: list[Case] = []
    by_name = {e.name: e for e in json_endpoints(known)}
    deep_array = nested_array(HUGE_NESTING).text.encode()
    deep_object = nested_object(HUGE_NESTING).text.encode()
    for endpoint in by_name.values():
        out.append(endpoint.case("body nested 100,000 levels (array)", deep_array))
        out.append(endpoint.case("body nested 100,000 levels (object)", deep_object))
    gen, chat, create = by_name["generate"], by_name["chat"], by_name["create"]

    def body(endpoint: JsonEndpoint, label: str, doc: dict[str, Any], **kw: Any) -> None:
        server_path = endpoint.name == "create" and names_server_path(doc)
        out.append(endpoint.case(label, encode(doc), server_path=server_path, **kw))

    generate_base = {"model": DEFAULT_MODEL, "prompt": "Hi", "stream": False, "options": dict(BASE_OPTIONS)}
    chat_base = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                 "options": dict(BASE_OPTIONS)}
    for context in ([1, 2, 3], [-1], [10**9], [262144], [2**31 - 1], [2**31], [2**63]):
        body(gen, f"context = {short(context)}", {**generate_base, "context": context}, wrong_type=not fits("int_list", context))
    for stream in ("false", "true", 0, 1, "", None):
        body(gen, f"stream = {stream!r}", {**generate_base, "stream": stream}, wrong_type=not fits("bool", stream))
        body(chat, f"stream = {stream!r}", {**chat_base, "stream": stream}, wrong_type=not fits("bool", stream))
    body(create, 'stream = "false"', {"model": "fuzz-create-0", "from": DEFAULT_MODEL, "stream": "false"}, wrong_type=True)
    for levels in (101, 5000):  # the first past the parser's nesting limit (100), and far past it
        for template in deep_templates(levels):
            body(gen, f"template deep {levels}: {short(template, 40)}", {**generate_base, "template": template})
        body(chat, f"template deep {levels}", {**chat_base, "template": deep_templates(levels)[0]})
        body(create, f"template deep {levels}", {"model": "fuzz-create-0", "from": DEFAULT_MODEL,
                                                  "template": deep_templates(levels)[5], "stream": False})
    body(gen, "template recursion", {**generate_base, "template": TEMPLATES[17]})
    body(gen, "template printf width 2000000", {**generate_base, "template": '{{ printf "%02000000d" 1 }}',
                                                "_debug_render_only": True})
    for doc in ({"model": "fuzz-create-0", "files": {"m.gguf": "/etc/passwd"}},
                {"model": "fuzz-create-0", "path": "/etc/shadow"},
                {"model": "fuzz-create-0", "modelfile": "FROM /etc/passwd"},
                {"model": "fuzz-create-0", "modelfile": "FROM ../../../../etc/passwd"},
                {"model": "fuzz-create-0", "modelfile": f"FROM {DEFAULT_MODEL}\nADAPTER /etc/passwd"},
                {"model": "fuzz-create-0", "from": "/etc/passwd"},
                {"model": "fuzz-create-0", "from": DEFAULT_MODEL, "adapters": {"a.gguf": "/etc/passwd"}},
                {"model": "fuzz-create-0", "files": {"../../etc/passwd": known.layer_digests[0]}},
                {"model": "fuzz-create-0", "files": {"m.gguf": "sha256:" + "0" * 64}},
                {"model": "fuzz-create-0", "files": {"m.gguf": "sha256:xyz"}},
                {"model": "fuzz-create-0", "files": {"m.gguf": "md5:d41d8cd98f00b204e9800998ecf8427e"}},
                {"model": "fuzz-create-0", "modelfile": "FROM @sha256:" + "0" * 64},
                {"model": "fuzz-create-0", "modelfile": "FROM @../../etc/passwd"}):
        for stream in (False, True):
            body(create, f"server path / bad digest {short(doc, 100)} stream={stream}", {**doc, "stream": stream})
    for images in ([HUGE_PNG], ["!!!"], [b64(b"random bytes")], [TINY_PNG]):
        body(gen, f"images = {short(images, 40)}", {**generate_base, "images": images})
        body(chat, f"messages.0.images = {short(images, 40)}",
             {**chat_base, "messages": [{"role": "user", "content": "hi", "images": images}]})
    for schema in (nested_schema(200), nested_schema(64), {"type": "string", "pattern": "(" * 1000}):
        body(gen, f"format = {short(schema, 60)}", {**generate_base, "format": schema})
    for prompt in ("\ud800", "\x00", "x" * 100_000):
        body(gen, f"prompt = {short(prompt, 30)}", {**generate_base, "prompt": prompt})
    body(gen, "system = '\\udfff'", {**generate_base, "system": "\udfff"})
    body(chat, "messages.0.content = '\\ud800'", {**chat_base, "messages": [{"role": "user", "content": "\ud800"}]})
    body(by_name["embed"], "input = '\\ud800'", {"model": DEFAULT_MODEL, "input": "\ud800"})
    body(by_name["v1-completions"], "prompt = 'a\\udc80b'", {"model": DEFAULT_MODEL, "prompt": "a\udc80b", "max_tokens": 4})
    for keep_alive in ("9999999999999999999s", 1e308, 2**63, -(2**63), "1000000h", "-1s", "garbage", 0):
        body(gen, f"keep_alive = {keep_alive!r}", {**generate_base, "keep_alive": keep_alive})
        out.append(Case("list", "GET", "/api/ps", "ollama", f"GET /api/ps after keep_alive = {keep_alive!r}"))
    v1_chat = by_name["v1-chat"]
    body(v1_chat, "image_url 65535x65535", {"model": DEFAULT_MODEL, "max_tokens": 4, "messages": [
        {"role": "user", "content": CONTENT_PARTS[3]}]})
    body(v1_chat, "stream with include_usage", {"model": DEFAULT_MODEL, "max_tokens": 4, "stream": True,
                                                "stream_options": {"include_usage": True},
                                                "messages": [{"role": "user", "content": "hi"}]})
    pull = by_name["pull"]
    body(pull, "pull from a closed port, streamed (hung up after a few seconds)",
         {"model": f"{DEAD_REGISTRY}/library/fuzz:latest", "insecure": True}, cap=SLOW_TRANSFER_CAP)
    body(gen, "body just over the 64 MiB limit", {**generate_base, "prompt": "x" * (64 * 1024 * 1024)})
    return out
