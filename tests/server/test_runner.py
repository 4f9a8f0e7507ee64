"""Runner helpers that do not need a model: GPU layer choice and stop-string hold-back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from berth.server.runner.generation import logprob_entry, split_at_stop
from berth.server.runner.placement import gpu_layers, offloaded_share
from berth.server.runner.protocol import LoadSpec


def test_without_a_gpu_backend_everything_runs_on_the_cpu() -> None:
    for num_gpu in (-1, 0, 10, 999):
        assert gpu_layers(LoadSpec(model_path="m", num_gpu=num_gpu), supports_gpu=False) == 0


def test_with_a_gpu_backend_num_gpu_maps_to_layers() -> None:
    assert gpu_layers(LoadSpec(model_path="m", num_gpu=-1), supports_gpu=True) == -1  # all layers
    assert gpu_layers(LoadSpec(model_path="m", num_gpu=0), supports_gpu=True) == 0
    assert gpu_layers(LoadSpec(model_path="m", num_gpu=12), supports_gpu=True) == 12


def test_the_share_on_the_gpu_counts_the_output_layer_with_the_blocks() -> None:
    # Gemma 3 270M: 18 blocks, and llama.cpp's output layer as a 19th.
    assert offloaded_share(-1, 18) == 1.0
    assert offloaded_share(19, 18) == 1.0
    assert offloaded_share(999, 18) == 1.0
    assert offloaded_share(18, 18) == 18 / 19
    assert offloaded_share(5, 18) == 5 / 19
    assert offloaded_share(0, 18) == 0.0


def test_stop_strings_are_cut_and_prefixes_held_back() -> None:
    assert split_at_stop("hello <end", ["<end_of_turn>"]) == ("hello ", "<end", False)
    assert split_at_stop("hello <end_of_turn> more", ["<end_of_turn>"]) == ("hello ", "", True)
    assert split_at_stop("hello <x", ["<end_of_turn>"]) == ("hello <x", "", False)
    assert split_at_stop("anything", []) == ("anything", "", False)


@given(st.lists(st.text(alphabet="ab<>", max_size=4), max_size=12))
def test_streaming_through_stop_holdback_equals_cutting_the_whole_text(pieces: list[str]) -> None:
    stops = ["<ab>", "ba"]
    emitted, pending, hit = "", "", False
    for piece in pieces:
        out, pending, hit = split_at_stop(pending + piece, stops)
        emitted += out
        if hit:
            break
    if not hit:
        emitted += pending
    whole = "".join(pieces)
    cut = min((whole.find(s) for s in stops if s in whole), default=-1)
    assert emitted == (whole[:cut] if cut >= 0 else whole)


def test_batch_slots_are_capped_by_the_memory_their_kv_caches_need() -> None:
    from berth.server.runner.placement import kv_slots_that_fit

    gemma = {"general.architecture": "gemma3", "gemma3.block_count": "18", "gemma3.attention.head_count": "4",
             "gemma3.attention.head_count_kv": "1", "gemma3.attention.key_length": "256",
             "gemma3.attention.value_length": "256", "gemma3.embedding_length": "640"}
    per_slot = 18 * 4096 * 1 * (256 + 256) * 2  # f16 K and V for 4096 tokens
    assert kv_slots_that_fit(gemma, 4096, 8 * per_slot) == 4  # half the memory: 4 slots
    assert kv_slots_that_fit(gemma, 4096, per_slot) == 1  # never below one
    assert kv_slots_that_fit(gemma, 8192, 8 * per_slot) == 2
    assert kv_slots_that_fit({"general.architecture": "x"}, 4096, per_slot) > 4  # unknown: no cap
    assert kv_slots_that_fit(gemma, 4096, None) > 4


def test_logprob_entry_is_the_log_softmax_with_the_likeliest_alternatives_in_order() -> None:
    import ctypes
    import math

    import numpy as np

    values = np.random.default_rng(7).normal(size=5000).astype(np.float32) * 4
    row = (ctypes.c_float * len(values))(*values.tolist())
    entry = logprob_entry(row, len(values), 42, 5, lambda t: f"<{t}>".encode())
    log_total = math.log(sum(math.exp(float(v)) for v in values))
    assert entry["token"] == "<42>" and entry["bytes"] == list(b"<42>")
    assert abs(entry["logprob"] - (float(values[42]) - log_total)) < 1e-4
    expected = [int(i) for i in np.argsort(-values, kind="stable")[:5]]
    assert [t["token"] for t in entry["top_logprobs"]] == [f"<{i}>" for i in expected]
    assert all(abs(t["logprob"] - (float(values[i]) - log_total)) < 1e-4
               for t, i in zip(entry["top_logprobs"], expected))
    assert "top_logprobs" not in logprob_entry(row, len(values), 42, 0, lambda t: b"x")
