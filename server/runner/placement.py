"""Where a runner puts a model: threads, GPU layers, and how many batch slots fit in memory."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from berth.server.runner.protocol import LoadSpec


# At most this share of the memory available at load time goes to the batch slots' KV caches.
KV_MEMORY_SHARE = 0.5


def kv_slots_that_fit(metadata: Mapping[str, str], num_ctx: int, available: int | None) -> int:
    """How many slots' f16 KV caches (num_ctx tokens each) fit in KV_MEMORY_SHARE of `available`
    bytes, from the GGUF's own figures; a large number when they are not known."""
    arch = metadata.get("general.architecture", "")

    def number(key: str) -> int | None:
        value = metadata.get(f"{arch}.{key}")
        return int(value) if value is not None and str(value).isdigit() else None

    layers, heads, kv_heads, width = (number("block_count"), number("attention.head_count"),
                                      number("attention.head_count_kv"), number("embedding_length"))
    if not (available and layers and heads and width):
        return 1 << 16
    key = number("attention.key_length") or width // heads
    value = number("attention.value_length") or width // heads
    per_slot = layers * num_ctx * (kv_heads or heads) * (key + value) * 2
    return max(1, int(available * KV_MEMORY_SHARE) // per_slot)


def physical_cores() -> int:
    """The cores this process may run on, hyperthread siblings counted once: the default thread
    count, as Ollama's (llama-cpp-python's own default, half the logical CPUs, leaves half of a
    machine without hyperthreads idle)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpu_layers(spec: LoadSpec, supports_gpu: bool) -> int:
    """num_gpu -1 means all layers when llama.cpp has a GPU backend; otherwise what was asked."""
    if not supports_gpu:
        return 0
    if spec.num_gpu < 0:
        return -1  # llama.cpp: offload every layer
    return spec.num_gpu


def offloaded_share(n_gpu_layers: int, n_layer: int) -> float:
    """The part of the model on the GPU, for `/api/ps`'s size_vram: llama.cpp offloads the last
    `n_gpu_layers` of the n_layer blocks plus the output layer (-1: all of them)."""
    offloadable = n_layer + 1
    if n_gpu_layers < 0 or n_gpu_layers >= offloadable:
        return 1.0
    return n_gpu_layers / offloadable


@contextlib.contextmanager
def repacked_weights(llama_cpp: Any, wanted: bool) -> Iterator[None]:
    """While a `Llama` is made: whether llama.cpp repacks its weights for the CPU's fastest
    kernels (llama-cpp-python has no parameter for it, so its model defaults are wrapped)."""
    if wanted:
        yield
        return
    module = llama_cpp.llama_cpp
    defaults = module.llama_model_default_params

    def without_repacking() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    module.llama_model_default_params = without_repacking
    try:
        yield
    finally:
        module.llama_model_default_params = defaults
