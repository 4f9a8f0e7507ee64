"""A small, bounded inspector for GGUF model files, which treats every header field as hostile.

GGUF files reach the server from clients (`POST /api/blobs` then `/api/create`) and from
registries (pull), so nothing in them is trusted. Ollama's history is the checklist: a 4-byte
`GGUF` file crashed the server (CVE-2024-39720), huge counts caused unbounded allocations and
zero alignments a divide-by-zero (CVE-2024-8063, CVE-2025-0315 and friends), and tensor
offsets past the end of the file let a quantiser read heap memory that was then pushed to an
attacker (CVE-2026-7482). This module reads only the header, with a buffered reader that never
memory-maps the file nor reads it whole, and it checks every length, count, type and offset
against the limits below and against the size of the file before it acts on it.

Supported: GGUF versions 2 and 3, little-endian. Anything else raises `InvalidGGUF`.

Limits (all violations raise `InvalidGGUF` naming what is wrong):

* `MAX_STRING_BYTES` (16 MiB) for any string value, as Ollama caps it; keys and tensor names
  are capped at `MAX_KEY_BYTES` / `MAX_TENSOR_NAME_BYTES` (64 KiB - 1, the GGUF spec's key limit).
* `MAX_ARRAY_ITEMS` (64 Mi) elements per array, as Ollama caps it, and the array's minimum byte
  size (elements x element size, 8 bytes per string) must fit in what is left of the file.
  Nested arrays are rejected (llama.cpp and Ollama reject them too).
* The key/value count and the tensor count must fit in the file (every key/value entry takes at
  least `_MIN_KV_BYTES`, every tensor entry at least `_MIN_TENSOR_INFO_BYTES`), and they are
  also capped at `MAX_KV_COUNT` / `MAX_TENSOR_COUNT`, far above any real model.
* What the parser keeps in memory (keys, kept values, tensor names) is charged against
  `MAX_RETAINED_BYTES` (an estimate that includes Python's per-object overhead).
* Tensors: 1 to `MAX_TENSOR_DIMS` (4) dimensions, each dimension and the element count within
  int64, a known ggml type (`GGML_TYPES`), a row length that is a multiple of the type's block
  size, a data offset that is a multiple of the alignment, and data that ends inside the file.
* `general.alignment` (default 32) must be a uint32 power of two: llama.cpp reads the key with an
  assertion on its type, so a different type would abort the (in-process) runner later.
* Duplicate keys and duplicate tensor names are rejected (llama.cpp rejects them too).

`inspect_file` runs the parser in this process; `inspect_isolated` runs it in a spawned child
with an address-space limit and a timeout, so that even a parser bug cannot take the server down.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import stat
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, BinaryIO, Final

from berth.registry.errors import InvalidInput

__all__ = [
    "FILE_TYPE_NAMES",
    "GGML_TYPES",
    "MAX_ARRAY_ITEMS",
    "MAX_KEY_BYTES",
    "MAX_KV_COUNT",
    "MAX_RETAINED_BYTES",
    "MAX_STRING_BYTES",
    "MAX_TENSOR_COUNT",
    "MAX_TENSOR_DIMS",
    "MAX_TENSOR_NAME_BYTES",
    "NOT_GGUF_MESSAGE",
    "GGMLType",
    "GGUFInfo",
    "InvalidGGUF",
    "TensorInfo",
    "TruncatedArray",
    "human_parameter_size",
    "inspect_file",
    "inspect_isolated",
    "model_info",
]


class InvalidGGUF(InvalidInput):
    """A file is not GGUF, or its GGUF header is malformed, hostile or unsupported."""


#: Ollama's exact text for a blob that does not start with the GGUF magic (clients match on it).
NOT_GGUF_MESSAGE: Final = "supplied file was not in GGUF format"

# ---------------------------------------------------------------------------------------------
# Limits. They bound both memory and work; each is far above what real models need.

MAX_STRING_BYTES: Final = 16 << 20  # Ollama's fs/gguf MaxStringLength
MAX_KEY_BYTES: Final = (1 << 16) - 1  # the GGUF spec: keys are at most 2^16 - 1 bytes
MAX_TENSOR_NAME_BYTES: Final = (1 << 16) - 1  # llama.cpp wants < 64; the loader enforces that
MAX_ARRAY_ITEMS: Final = 64 << 20  # Ollama's fs/gguf MaxArraySize
MAX_KV_COUNT: Final = 1 << 16  # real models have well under 100 keys
MAX_TENSOR_COUNT: Final = 1 << 20  # real models have at most tens of thousands of tensors
MAX_TENSOR_DIMS: Final = 4  # GGML_MAX_DIMS
MAX_RETAINED_BYTES: Final = 256 << 20  # estimated memory held for metadata and tensor names
DEFAULT_ALIGNMENT: Final = 32  # GGUF_DEFAULT_ALIGNMENT

_INT64_MAX: Final = (1 << 63) - 1
_HEADER_BYTES: Final = 24  # magic, version, tensor count, kv count
# Smallest possible encodings, used to bound counts by the bytes left in the file:
# key length (8) + key (0) + value type (4) + smallest value (1).
_MIN_KV_BYTES: Final = 13
# name length (8) + name (0) + n_dims (4) + one dimension (8) + ggml type (4) + offset (8).
_MIN_TENSOR_INFO_BYTES: Final = 32
# What one kept Python object costs beyond its payload, for the retained-memory estimate.
_OBJECT_OVERHEAD: Final = 64
_READ_CHUNK: Final = 256 << 10  # our read-ahead window; headers are parsed through it

_MAGIC: Final = b"GGUF"

# GGUF metadata value types.
_T_UINT8, _T_INT8, _T_UINT16, _T_INT16, _T_UINT32, _T_INT32 = 0, 1, 2, 3, 4, 5
_T_FLOAT32, _T_BOOL, _T_STRING, _T_ARRAY = 6, 7, 8, 9
_T_UINT64, _T_INT64, _T_FLOAT64 = 10, 11, 12

_TYPE_NAMES: Final[Mapping[int, str]] = {
    _T_UINT8: "uint8",
    _T_INT8: "int8",
    _T_UINT16: "uint16",
    _T_INT16: "int16",
    _T_UINT32: "uint32",
    _T_INT32: "int32",
    _T_FLOAT32: "float32",
    _T_BOOL: "bool",
    _T_STRING: "string",
    _T_ARRAY: "array",
    _T_UINT64: "uint64",
    _T_INT64: "int64",
    _T_FLOAT64: "float64",
}

# struct format letter per fixed-size scalar type (bool is read as a byte: any non-zero is true,
# as in Go's binary.Read and llama.cpp, so a stray value cannot fail the parse).
_SCALAR_FORMATS: Final[Mapping[int, str]] = {
    _T_UINT8: "B",
    _T_INT8: "b",
    _T_UINT16: "H",
    _T_INT16: "h",
    _T_UINT32: "I",
    _T_INT32: "i",
    _T_FLOAT32: "f",
    _T_BOOL: "B",
    _T_UINT64: "Q",
    _T_INT64: "q",
    _T_FLOAT64: "d",
}
_SCALAR_STRUCTS: Final[Mapping[int, struct.Struct]] = {
    t: struct.Struct("<" + f) for t, f in _SCALAR_FORMATS.items()
}

_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_COUNTS: Final = struct.Struct("<QQ")  # v2/v3 tensor count, kv count
_DIMS: Final[tuple[struct.Struct, ...]] = tuple(struct.Struct(f"<{n}Q") for n in range(MAX_TENSOR_DIMS + 1))


# ---------------------------------------------------------------------------------------------
# ggml tensor types: (block size in elements, bytes per block). Values follow ggml's own
# ggml-common.h (`ggml_type_size` / `ggml_blck_size`); a tensor of n elements takes
# n / block_size * type_size bytes.


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor element type and its storage geometry."""

    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block


_QK_K: Final = 256  # elements in a k-quant super-block

GGML_TYPES: Final[Mapping[int, GGMLType]] = {
    0: GGMLType("F32", 1, 4),
    1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 2 + 16),
    3: GGMLType("Q4_1", 32, 2 + 2 + 16),
    # 4 and 5 were Q4_2/Q4_3 (removed from ggml). Ollama's early gpt-oss blobs (Aug 2025) stored
    # MXFP4 tensors under id 4 and Ollama read them as MXFP4 until May 2026, so blobs pulled
    # from its registry can still carry it; the geometry is MXFP4's.
    4: GGMLType("MXFP4", 32, 1 + 16),
    6: GGMLType("Q5_0", 32, 2 + 4 + 16),
    7: GGMLType("Q5_1", 32, 2 + 2 + 4 + 16),
    8: GGMLType("Q8_0", 32, 2 + 32),
    # Two fp16 (d, s) + 32 quants = 36, per ggml's static_assert. (gguf-py's table still says 40,
    # from when d and s were floats; Q8_1 is an activation format and never stored in files.)
    9: GGMLType("Q8_1", 32, 2 + 2 + 32),
    10: GGMLType("Q2_K", _QK_K, 2 + 2 + _QK_K // 16 + _QK_K // 4),
    11: GGMLType("Q3_K", _QK_K, 2 + _QK_K // 4 + _QK_K // 8 + 12),
    12: GGMLType("Q4_K", _QK_K, 2 + 2 + _QK_K // 2 + 12),
    13: GGMLType("Q5_K", _QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 8 + 12),
    14: GGMLType("Q6_K", _QK_K, 2 + _QK_K // 2 + _QK_K // 4 + _QK_K // 16),
    15: GGMLType("Q8_K", _QK_K, 4 + _QK_K + _QK_K // 8),
    16: GGMLType("IQ2_XXS", _QK_K, 2 + _QK_K // 4),
    17: GGMLType("IQ2_XS", _QK_K, 2 + _QK_K // 4 + _QK_K // 32),
    18: GGMLType("IQ3_XXS", _QK_K, 2 + _QK_K // 4 + _QK_K // 8),
    19: GGMLType("IQ1_S", _QK_K, 2 + _QK_K // 8 + _QK_K // 16),
    20: GGMLType("IQ4_NL", 32, 2 + 16),
    21: GGMLType("IQ3_S", _QK_K, 2 + _QK_K // 4 + _QK_K // 8 + _QK_K // 32 + 4),
    22: GGMLType("IQ2_S", _QK_K, 2 + _QK_K // 4 + _QK_K // 16),
    23: GGMLType("IQ4_XS", _QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 64),
    24: GGMLType("I8", 1, 1),
    25: GGMLType("I16", 1, 2),
    26: GGMLType("I32", 1, 4),
    27: GGMLType("I64", 1, 8),
    28: GGMLType("F64", 1, 8),
    29: GGMLType("IQ1_M", _QK_K, _QK_K // 8 + _QK_K // 16 + _QK_K // 32),
    30: GGMLType("BF16", 1, 2),
    # 31-33 (Q4_0_4_4 ...) and 36-38 (IQ4_NL_4_4 ...) were removed from GGUF files by ggml.
    34: GGMLType("TQ1_0", _QK_K, 2 + _QK_K // 64 + (_QK_K - 4 * _QK_K // 64) // 5),
    35: GGMLType("TQ2_0", _QK_K, 2 + _QK_K // 4),
    39: GGMLType("MXFP4", 32, 1 + 16),
    40: GGMLType("NVFP4", 64, 4 + 32),
    41: GGMLType("Q1_0", 128, 2 + 16),
}

#: `general.file_type` (llama_ftype) → name, as Ollama prints it (docs/ollama-compatibility.md, "Create layers").
FILE_TYPE_NAMES: Final[Mapping[int, str]] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
}


# ---------------------------------------------------------------------------------------------
# Results.


@dataclass(frozen=True)
class TruncatedArray:
    """Stands in for an array longer than `max_array_items`: its items were skipped, not kept."""

    length: int
    item_type: str  # GGUF element type name: "string", "uint32", "float32", ...


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's header entry, validated: its data lies inside the file."""

    name: str
    type: str  # ggml type name, e.g. "Q4_K"
    shape: tuple[int, ...]  # GGUF order: the row length first
    offset: int  # data offset relative to GGUFInfo.data_offset
    nbytes: int  # bytes of data


@dataclass(frozen=True)
class GGUFInfo:
    """What the header of one GGUF file says, after validation. Plain, picklable data."""

    version: int
    architecture: str  # general.architecture, "" if missing or not a string
    file_type: int | None  # general.file_type, None if missing or not an integer
    # Name of file_type. Ollama prints "unknown" for 0 (F32) as well as for missing; we print
    # "F32" when the key is present and 0, and "unknown" when missing or not in the table.
    file_type_name: str
    parameter_count: int  # sum of the element counts of all tensors (the file's own is ignored)
    parameter_size: str  # human_parameter_size(parameter_count), Ollama's `model_type`
    context_length: int | None  # <arch>.context_length
    embedding_length: int | None  # <arch>.embedding_length
    kind: str  # "model", "adapter" or "projector" (docs/ollama-compatibility.md, "Create layers")
    chat_template: str | None  # tokenizer.chat_template
    # Every key/value pair in file order. Arrays longer than max_array_items are
    # TruncatedArray markers; strings are decoded as UTF-8 with errors="replace".
    metadata: dict[str, object]
    tensor_count: int
    file_size: int
    alignment: int = DEFAULT_ALIGNMENT  # general.alignment, validated
    data_offset: int = 0  # where the tensor data section starts (aligned end of the header)
    tensors: tuple[TensorInfo, ...] = ()  # in file order, for `/api/show`'s `tensors`

    @property
    def media_type(self) -> str:
        """The Ollama layer media type this file gets on create."""
        return f"application/vnd.ollama.image.{self.kind}"


# ---------------------------------------------------------------------------------------------
# Reading.


def _invalid(message: str) -> InvalidGGUF:
    return InvalidGGUF(f"invalid GGUF: {message}")


def _q(text: str) -> str:
    """A key or tensor name quoted for an error message: control characters escaped and cut
    short, since it is attacker-controlled and messages end up in logs and terminals."""
    shown = text if len(text) <= 120 else text[:120] + "..."
    out = []
    for c in shown:
        if c in '"\\':
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return '"' + "".join(out) + '"'


class _Budget:
    """Bytes the parser may still keep in memory; charged for every retained key, value, name."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def charge(self, nbytes: int, what: str) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise _invalid(
                f"{what} takes the header's retained size past {MAX_RETAINED_BYTES >> 20} MiB; "
                "the metadata is too large to inspect"
            )


class _Reader:
    """Sequential little-endian reads over a file of known size, through our own window.

    Every read first checks that the bytes exist (`remaining`), so a length field can never make
    us read, allocate or seek past the end of the file. We keep our own read-ahead window rather
    than using a BufferedReader so that skipping over (say) 262k tokenizer strings costs one
    `struct.unpack_from` per string instead of a method call chain.
    """

    __slots__ = ("_raw", "_size", "_buf", "_buf_start", "pos")

    def __init__(self, raw: BinaryIO, size: int) -> None:
        self._raw = raw
        self._size = size
        self._buf = b""
        self._buf_start = 0
        self.pos = 0

    @property
    def remaining(self) -> int:
        return self._size - self.pos

    def _eof(self, n: int, what: str) -> InvalidGGUF:
        return _invalid(
            f"file ends at byte {self._size} while reading {what} at byte {self.pos} "
            f"({n} bytes needed, {max(self.remaining, 0)} left)"
        )

    def _window(self, n: int, what: str) -> int:
        """Ensure n bytes at `pos` are in the window; return their index in it."""
        if n > self._size - self.pos:
            raise self._eof(n, what)
        i = self.pos - self._buf_start
        if i + n <= len(self._buf):
            return i
        want = min(max(n, _READ_CHUNK), self._size - self.pos)
        self._raw.seek(self.pos)
        parts: list[bytes] = []
        got = 0
        while got < want:
            part = self._raw.read(want - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        if got < n:  # the file shrank under us since we took its size
            raise self._eof(n, what)
        self._buf = parts[0] if len(parts) == 1 else b"".join(parts)
        self._buf_start = self.pos
        return 0

    def unpack(self, st: struct.Struct, what: str) -> tuple[Any, ...]:
        i = self._window(st.size, what)
        self.pos += st.size
        return st.unpack_from(self._buf, i)

    def u32(self, what: str) -> int:
        i = self._window(4, what)
        self.pos += 4
        return int(_U32.unpack_from(self._buf, i)[0])

    def u64(self, what: str) -> int:
        i = self._window(8, what)
        self.pos += 8
        return int(_U64.unpack_from(self._buf, i)[0])

    def read(self, n: int, what: str) -> bytes:
        i = self._window(n, what)
        self.pos += n
        return self._buf[i : i + n]

    def skip(self, n: int, what: str) -> None:
        if n > self._size - self.pos:
            raise self._eof(n, what)
        self.pos += n

    def string_length(self, limit: int, what: str) -> int:
        n = self.u64(f"the length of {what}")
        if n > limit:
            raise _invalid(f"{what} is {n} bytes long, over the limit of {limit} bytes")
        if n > self.remaining:
            raise _invalid(
                f"{what} claims {n} bytes at byte {self.pos}, but only {self.remaining} bytes "
                "remain in the file"
            )
        return n

    def string(self, limit: int, what: str) -> str:
        n = self.string_length(limit, what)
        return self.read(n, what).decode("utf-8", errors="replace")

    def skip_strings(self, count: int, what: str) -> None:
        """Skip `count` length-prefixed strings, validating every length."""
        size = self._size
        unpack_from = _U64.unpack_from
        for index in range(count):
            i = self.pos - self._buf_start
            if i + 8 > len(self._buf):
                i = self._window(8, f"the length of item {index} of {what}")
            n = unpack_from(self._buf, i)[0]
            self.pos += 8
            if n > MAX_STRING_BYTES:
                raise _invalid(
                    f"item {index} of {what} is {n} bytes long, over the limit of {MAX_STRING_BYTES} bytes"
                )
            if n > size - self.pos:
                raise _invalid(
                    f"item {index} of {what} claims {n} bytes at byte {self.pos}, but only "
                    f"{size - self.pos} bytes remain in the file"
                )
            self.pos += n


def _read_array(r: _Reader, quoted: str, max_items: int, budget: _Budget) -> list[object] | TruncatedArray:
    what = f"array {quoted}"
    item_type = r.u32(f"the element type of {what}")
    count = r.u64(f"the length of {what}")
    if item_type == _T_ARRAY:
        raise _invalid(f"{what} holds nested arrays, which GGUF readers do not support")
    type_name = _TYPE_NAMES.get(item_type)
    if type_name is None:
        raise _invalid(f"{what} has unknown element type {item_type}")
    if count > MAX_ARRAY_ITEMS:
        raise _invalid(f"{what} has {count} items, over the limit of {MAX_ARRAY_ITEMS}")
    # Every element needs at least this many bytes: its fixed size, or a string's 8-byte length.
    item_bytes = 8 if item_type == _T_STRING else _SCALAR_STRUCTS[item_type].size
    if count * item_bytes > r.remaining:
        raise _invalid(
            f"{what} claims {count} {type_name} items (at least {count * item_bytes} bytes), "
            f"but only {r.remaining} bytes remain in the file"
        )

    if count > max_items:
        # Keep only the length: memory stays bounded whatever the file says.
        if item_type == _T_STRING:
            r.skip_strings(count, what)
        else:
            r.skip(count * item_bytes, what)
        return TruncatedArray(count, type_name)

    if item_type == _T_STRING:
        items: list[object] = []
        for index in range(count):
            s = r.string(MAX_STRING_BYTES, f"item {index} of {what}")
            budget.charge(len(s) + _OBJECT_OVERHEAD, what)
            items.append(s)
        return items
    budget.charge(count * (item_bytes + _OBJECT_OVERHEAD), what)
    raw = r.read(count * item_bytes, what)
    values = list(struct.unpack(f"<{count}{_SCALAR_FORMATS[item_type]}", raw))
    if item_type == _T_BOOL:
        return [v != 0 for v in values]
    if item_type == _T_FLOAT32:
        return [_short_float32(v) for v in values]
    return values


_F32: Final = struct.Struct("<f")
_FLOAT32_MIN_NORMAL: Final = 2.0**-126


def _short_float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32, as a Python float.

    A float32 such as 1e-6 widens to 9.999999974752427e-07; Ollama (Go) prints float32 values
    with float32 precision ("1e-06"), and so do we, by picking the shortest round-tripping
    decimal. For normal numbers '%.6g' already gives the shortest form when 6 or fewer digits
    suffice, because float32's relative precision (6e-8) is finer than a 6-digit step;
    subnormals are coarser, so for them every length is tried.
    """
    if not math.isfinite(value):
        return value
    bits = _F32.pack(value)
    for digits in (6, 7, 8) if abs(value) >= _FLOAT32_MIN_NORMAL else range(1, 9):
        candidate = float(f"{value:.{digits}g}")
        if _F32.pack(candidate) == bits:
            return candidate
    return float(f"{value:.9g}")  # 9 digits always round-trip a float32


def _read_value(r: _Reader, value_type: int, quoted: str, budget: _Budget) -> object:
    if value_type == _T_STRING:
        s = r.string(MAX_STRING_BYTES, f"the value of {quoted}")
        budget.charge(len(s) + _OBJECT_OVERHEAD, f"the value of {quoted}")
        return s
    st = _SCALAR_STRUCTS.get(value_type)
    if st is None:
        raise _invalid(f"key {quoted} has unknown value type {value_type}")
    (value,) = r.unpack(st, f"the value of {quoted}")
    if value_type == _T_BOOL:
        return value != 0
    if value_type == _T_FLOAT32:
        return _short_float32(value)
    return value


def _open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open `path` for reading, refusing anything but a regular file.

    O_NONBLOCK keeps a FIFO from blocking the open, so `/dev/random`, pipes and devices are
    refused at once instead of being read forever (CVE-2024-39721). It has no effect on the
    reads of a regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _invalid(f"{os.fspath(path)!r} is not a regular file")
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _int_value(metadata: Mapping[str, object], key: str) -> int | None:
    value = metadata.get(key)
    # bool is an int subclass in Python; a bool is not a length.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _str_value(metadata: Mapping[str, object], key: str) -> str | None:
    value = metadata.get(key)
    return value if isinstance(value, str) else None


def _kind(metadata: Mapping[str, object], architecture: str) -> str:
    """Ollama's media-type rule (server/create.go): adapter, projector or model.

    Ollama prefixes non-`general.`/`tokenizer.` keys with the architecture, so `block_count`
    means `<arch>.block_count`.
    """
    general_type = _str_value(metadata, "general.type")
    if general_type == "adapter":
        return "adapter"
    if general_type in ("projector", "mmproj"):
        return "projector"
    block_count = _int_value(metadata, f"{architecture}.block_count") or 0
    vision_blocks = _int_value(metadata, f"{architecture}.vision.block_count") or 0
    if block_count == 0 and vision_blocks > 0:
        return "projector"
    if (
        architecture == "clip"
        and block_count == 0
        and (
            metadata.get("clip.has_vision_encoder") is True or metadata.get("clip.has_audio_encoder") is True
        )
    ):
        return "projector"
    return "model"


def inspect_file(path: str | os.PathLike[str], *, max_array_items: int = 5) -> GGUFInfo:
    """Parse and validate the header of the GGUF file at `path`, in this process.

    Reads only the header (key/values and tensor infos), never the tensor data, and never
    more than the limits in this module's docstring allow, so time and memory are bounded
    by the header's size. Arrays with more than `max_array_items` items are kept as
    `TruncatedArray` markers. Raises `InvalidGGUF` for a non-GGUF or malformed file (the
    message says what is wrong) and `OSError` if the file cannot be opened.
    """
    if isinstance(max_array_items, bool) or not isinstance(max_array_items, int):
        raise TypeError("max_array_items must be an int")
    if max_array_items < 0:
        raise ValueError("max_array_items must be >= 0")
    with _open_regular(path) as raw:
        file_size = os.fstat(raw.fileno()).st_size
        return _parse(raw, file_size, max_array_items)


def _parse(raw: BinaryIO, file_size: int, max_array_items: int) -> GGUFInfo:
    r = _Reader(raw, file_size)
    if file_size < len(_MAGIC) or r.read(len(_MAGIC), "the magic") != _MAGIC:
        raise InvalidGGUF(NOT_GGUF_MESSAGE)
    if file_size < _HEADER_BYTES:
        raise _invalid(
            f"the file is {file_size} bytes long, too short for a GGUF header ({_HEADER_BYTES} bytes)"
        )

    version = r.u32("the version")
    if version not in (2, 3):
        if version != 0 and version & 0xFFFF == 0:
            # A byte-swapped small number: the file was written big-endian.
            raise _invalid("big-endian GGUF files are not supported")
        if version == 1:
            raise _invalid("GGUF version 1 is not supported (only versions 2 and 3)")
        raise _invalid(f"unknown GGUF version {version} (only versions 2 and 3 are supported)")

    tensor_count, kv_count = r.unpack(_COUNTS, "the entry counts")
    if kv_count > MAX_KV_COUNT:
        raise _invalid(f"the header claims {kv_count} key/value pairs, over the limit of {MAX_KV_COUNT}")
    if tensor_count > MAX_TENSOR_COUNT:
        raise _invalid(f"the header claims {tensor_count} tensors, over the limit of {MAX_TENSOR_COUNT}")
    least = kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES
    if least > r.remaining:
        raise _invalid(
            f"the header claims {kv_count} key/value pairs and {tensor_count} tensors, which need "
            f"at least {least} bytes, but only {r.remaining} bytes follow the header"
        )

    budget = _Budget(MAX_RETAINED_BYTES)
    metadata: dict[str, object] = {}
    value_types: dict[str, int] = {}
    for index in range(kv_count):
        key = r.string(MAX_KEY_BYTES, f"the key of metadata entry {index}")
        quoted = _q(key)
        if key in metadata:
            raise _invalid(f"duplicate key {quoted}")
        budget.charge(len(key) + _OBJECT_OVERHEAD, f"key {quoted}")
        value_type = r.u32(f"the value type of {quoted}")
        if value_type == _T_ARRAY:
            metadata[key] = _read_array(r, quoted, max_array_items, budget)
        else:
            metadata[key] = _read_value(r, value_type, quoted, budget)
        value_types[key] = value_type

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        if value_types["general.alignment"] != _T_UINT32:
            raise _invalid(
                f'"general.alignment" must be a uint32, not {_TYPE_NAMES[value_types["general.alignment"]]}'
            )
        alignment = _int_value(metadata, "general.alignment") or 0
        if alignment <= 0 or alignment & (alignment - 1):
            raise _invalid(f'"general.alignment" is {alignment}, which is not a power of two')

    # Tensor infos; their bounds are checked once the data section's start is known.
    least = tensor_count * _MIN_TENSOR_INFO_BYTES
    if least > r.remaining:
        raise _invalid(
            f"the header claims {tensor_count} tensors, which need at least {least} bytes, "
            f"but only {r.remaining} bytes remain in the file"
        )
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    parameter_count = 0
    for index in range(tensor_count):
        name = r.string(MAX_TENSOR_NAME_BYTES, f"the name of tensor {index}")
        quoted = _q(name)
        if name in names:
            raise _invalid(f"duplicate tensor name {quoted}")
        # The name is held twice (set and TensorInfo), plus the TensorInfo, its shape and ints.
        budget.charge(2 * len(name) + 8 * _OBJECT_OVERHEAD, f"tensor {quoted}")
        names.add(name)
        n_dims = r.u32(f"the dimension count of tensor {quoted}")
        if not 1 <= n_dims <= MAX_TENSOR_DIMS:
            raise _invalid(f"tensor {quoted} has {n_dims} dimensions; 1 to {MAX_TENSOR_DIMS} are allowed")
        dims: list[int] = list(r.unpack(_DIMS[n_dims], f"the shape of tensor {quoted}"))
        for d in dims:
            if d > _INT64_MAX:
                raise _invalid(f"tensor {quoted} has a dimension of {d}, over the int64 limit")
        elements = math.prod(dims)
        if elements > _INT64_MAX:
            raise _invalid(f"tensor {quoted} has shape {dims}, whose {elements} elements overflow int64")
        type_id = r.u32(f"the type of tensor {quoted}")
        ggml_type = GGML_TYPES.get(type_id)
        if ggml_type is None:
            raise _invalid(f"tensor {quoted} has unknown ggml type {type_id}")
        if dims[0] % ggml_type.block_size:
            raise _invalid(
                f"tensor {quoted} has {dims[0]} elements per row, not a multiple of the "
                f"{ggml_type.name} block size {ggml_type.block_size}"
            )
        offset = r.u64(f"the data offset of tensor {quoted}")
        nbytes = elements // ggml_type.block_size * ggml_type.type_size
        tensors.append(TensorInfo(name, ggml_type.name, tuple(dims), offset, nbytes))
        parameter_count += elements

    # The data section starts at the end of the header, rounded up to the alignment.
    data_offset = -(-r.pos // alignment) * alignment
    for tensor in tensors:
        if tensor.offset % alignment:
            raise _invalid(
                f"tensor {_q(tensor.name)} data offset {tensor.offset} is not a multiple of the "
                f"alignment {alignment}"
            )
        end = data_offset + tensor.offset + tensor.nbytes
        if end > file_size:
            raise _invalid(
                f"tensor {_q(tensor.name)} data ends at byte {end}, past the end of the file "
                f"({file_size} bytes)"
            )

    architecture = _str_value(metadata, "general.architecture") or ""
    file_type = _int_value(metadata, "general.file_type")
    file_type_name = "unknown" if file_type is None else FILE_TYPE_NAMES.get(file_type, "unknown")
    return GGUFInfo(
        version=version,
        architecture=architecture,
        file_type=file_type,
        file_type_name=file_type_name,
        parameter_count=parameter_count,
        parameter_size=human_parameter_size(parameter_count),
        context_length=_int_value(metadata, f"{architecture}.context_length"),
        embedding_length=_int_value(metadata, f"{architecture}.embedding_length"),
        kind=_kind(metadata, architecture),
        chat_template=_str_value(metadata, "tokenizer.chat_template"),
        metadata=metadata,
        tensor_count=tensor_count,
        file_size=file_size,
        alignment=alignment,
        data_offset=data_offset,
        tensors=tuple(tensors),
    )


# ---------------------------------------------------------------------------------------------
# Isolation.


def _limit_child_resources(memory_limit_bytes: int) -> None:
    """Cap the child's address space and turn off core dumps (runs inside the child).

    The cap is the address space the child already has after start-up plus
    `memory_limit_bytes`: start-up mappings (the interpreter, and whatever the parent's
    `__main__` imports when it is re-imported by spawn) vary a lot between deployments, and an
    absolute cap below them would make every inspection fail.
    """
    try:
        import resource
    except ImportError:  # not POSIX: no rlimits to set
        return
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        current = 0
        try:
            with open("/proc/self/statm", "rb") as statm:
                current = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            pass  # no procfs: the cap is absolute
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = current + memory_limit_bytes
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        # Some platforms (macOS) refuse RLIMIT_AS; on Linux, where Berth runs, it must work.
        if sys.platform.startswith("linux"):
            raise


def _child_main(conn: Connection, path: str, max_array_items: int, memory_limit_bytes: int) -> None:
    """Entry point of the spawned inspector: parse, send one reply, exit."""
    reply: tuple[object, ...]
    try:
        _limit_child_resources(memory_limit_bytes)
        reply = ("ok", inspect_file(path, max_array_items=max_array_items))
    except InvalidGGUF as e:
        reply = ("invalid", e.message)
    except OSError as e:
        reply = ("oserror", e.errno, e.strerror, e.filename)
    except MemoryError:
        reply = ("crash", f"ran out of memory (limit {memory_limit_bytes} bytes)")
    except BaseException as e:  # a parser bug must still come back as an answer
        reply = ("crash", f"{type(e).__name__}: {e}")
    try:
        conn.send(reply)
    finally:
        conn.close()


def inspect_isolated(
    path: str | os.PathLike[str],
    *,
    max_array_items: int = 5,
    timeout: float = 60,
    memory_limit_bytes: int = 1 << 30,
) -> GGUFInfo:
    """Run `inspect_file` in a spawned child process and return its result.

    The child is started from a clean forkserver process, never forked from the caller (the server may hold native
    libraries and threads that must not be duplicated), caps its own address space
    (RLIMIT_AS) at its start-up size plus `memory_limit_bytes` and disables core dumps.
    If it does not answer within `timeout` seconds it is killed. A crash, an out-of-memory
    failure or a timeout raises `InvalidGGUF("invalid GGUF: inspection failed: ...")`; a
    malformed file raises the same `InvalidGGUF` as `inspect_file`; an unreadable path raises
    `OSError`. Blocks the calling thread: from async code, call it through a worker thread.
    The children come from a forkserver helper process (started on first use) that has this
    module preloaded, so each inspection costs a fork, not a fresh interpreter.
    """
    if isinstance(max_array_items, bool) or not isinstance(max_array_items, int):
        raise TypeError("max_array_items must be an int")
    if max_array_items < 0:
        raise ValueError("max_array_items must be >= 0")
    if not timeout > 0:
        raise ValueError("timeout must be > 0")
    if memory_limit_bytes <= 0:
        raise ValueError("memory_limit_bytes must be > 0")

    # forkserver: children fork from a clean helper process started once (never from this one,
    # which may hold native libraries and threads), with this module already imported there, so
    # an inspection costs a fork rather than a fresh interpreter and a re-import of `__main__`.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["registry.gguf"])
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=_child_main,
        args=(sender, os.fspath(path), max_array_items, memory_limit_bytes),
        name="berth-gguf-inspect",
        daemon=True,
    )
    reply: object = None
    timed_out = True  # until the child answers or hangs up
    exitcode: int | None = None
    try:
        process.start()
        sender.close()  # so that the child's exit shows up as EOF on our end
        if receiver.poll(timeout):
            timed_out = False
            try:
                reply = receiver.recv()
            except (EOFError, OSError):
                reply = None  # the child died before answering
    finally:
        receiver.close()
        sender.close()  # no-op when already closed
        if process.pid is not None:
            # A child that answered or hung up is exiting; give it a moment before the kill.
            process.join(0 if timed_out else 5)
            if process.is_alive():
                process.kill()
                process.join()
            exitcode = process.exitcode
            process.close()

    if timed_out:
        raise _invalid(f"inspection failed: no answer within {timeout:g} s")

    if not isinstance(reply, tuple) or not reply:
        if exitcode is not None and exitcode < 0:
            cause = f"the inspector was killed by signal {-exitcode}"
        else:
            cause = f"the inspector exited with status {exitcode} without answering"
        raise _invalid(f"inspection failed: {cause}")
    status = reply[0]
    if status == "ok" and isinstance(reply[1], GGUFInfo):
        return reply[1]
    if status == "invalid":
        raise InvalidGGUF(str(reply[1]))
    if status == "oserror":
        raise OSError(reply[1], reply[2], reply[3])
    raise _invalid(f"inspection failed: {reply[1] if len(reply) > 1 else 'unexpected reply'}")


# ---------------------------------------------------------------------------------------------
# Presentation.


def human_parameter_size(count: int) -> str:
    """Ollama's `format.HumanNumber`, as used for `model_type` / `parameter_size`.

    >= 1e9: "%.0fB" if whole else "%.1fB"; >= 1e6: "%.0fM" / "%.2fM"; >= 1e3: "%.0fK";
    else the integer. Like Go, the count is first converted to float64 and then divided;
    Python's % formatting rounds the exact binary value half-to-even, as Go's does.
    """
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError("count must be an int")
    if count < 0:
        raise ValueError("count must be >= 0")
    if count >= 1_000_000_000:
        number = float(count) / 1e9
        return f"{number:.0f}B" if number == math.floor(number) else f"{number:.1f}B"
    if count >= 1_000_000:
        number = float(count) / 1e6
        return f"{number:.0f}M" if number == math.floor(number) else f"{number:.2f}M"
    if count >= 1_000:
        return f"{float(count) / 1e3:.0f}K"
    return str(count)


def _json_safe(value: object) -> object:
    # NaN/Infinity are not JSON; strict encoders (Starlette's, Go's) refuse them.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def model_info(info: GGUFInfo, verbose: bool = False) -> dict[str, object]:
    """The `model_info` object of `/api/show` for one inspected file.

    As Ollama: all GGUF keys, sorted (Go sorts map keys when encoding), without
    `general.name` and `tokenizer.chat_template` (the template stays available as
    `info.chat_template`), with `general.parameter_count` set to the recomputed count.
    Arrays with more than 5 items become `[]` unless `verbose`; arrays the inspection did not
    keep (`TruncatedArray`) are always `[]`, so for a verbose answer the caller re-inspects
    the file with a large `max_array_items`. Non-finite floats become null.
    (Ollama at HEAD actually sends `null` for every non-empty array when not verbose;
    we follow the documented `[]`.)
    """
    out: dict[str, object] = {}
    for key in sorted(info.metadata):
        if key in ("general.name", "tokenizer.chat_template"):
            continue
        value = info.metadata[key]
        if isinstance(value, TruncatedArray):
            value = []
        elif isinstance(value, list) and len(value) > 5 and not verbose:
            value = []
        out[key] = _json_safe(value)
    out["general.parameter_count"] = info.parameter_count
    return dict(sorted(out.items()))
