"""What the API process and a runner process say to each other, and the types both sides share.

The API process never loads weights. Each loaded model lives in a runner process started with
*spawn* (fork after llama.cpp is initialised hangs), so a crash, an OOM or a hostile file takes
down one runner, and ending the process really frees its memory, GPU memory included. The API
side imports this module and `client` only; the rest of this package runs in the runner.

Messages are pickled dicts over a `multiprocessing` connection:
  parent -> runner: {"op": "generate" | "embed" | "tokenize" | "detokenize" | "cancel" | "shutdown",
                    "id": int, ...}
  runner -> parent: {"type": "ready", ...} once (or {"type": "load_error", "message"}), then per
                    request {"id", "type": "token" | "done" | "error" | "result", ...}; an error
                    has "kind": "input" when the request was at fault (a 400); the batch engine
                    sends each step's messages as one {"type": "many", "messages": [...]}
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any, Mapping


class InputError(ValueError):
    """A request the runner cannot serve as asked (reported to the client as a 400)."""


@dataclass(frozen=True)
class LoadSpec:
    """What a runner loads, and the load-time options that make it a different runner."""

    model_path: str
    adapter_paths: tuple[str, ...] = ()
    projector_path: str | None = None
    num_ctx: int = 4096
    num_batch: int = 512
    num_gpu: int = -1
    main_gpu: int = 0
    use_mmap: bool | None = None
    num_thread: int = 0
    # Generations at once through the continuous-batching engine: AUTO_SLOTS picks by hardware
    # (4 with the model on a GPU, 2 on the CPU, fewer when their KV caches would not fit in
    # memory); 0 or 1 serves one at a time with llama-cpp-python's own generate.
    batch_slots: int = 0
    # llama.cpp's flash attention (its own default, "auto", turns it on where the backend has it):
    # ~12% faster batched decode steps on CPU; both generation paths use the same setting so that
    # they give the same output.
    flash_attn: bool = True
    # Batch-invariant generation: flash attention off, weights not repacked for the CPU, one KV
    # stream per slot. Each of those makes llama.cpp round a sequence's numbers differently with
    # the batch it is in; without them a seeded request answers the same alone or among others.
    deterministic: bool = False


@dataclass(frozen=True)
class SamplingOptions:
    """A request's sampling options with Ollama's defaults, read the same by both generation paths."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int = -1
    num_predict: int = -1
    num_keep: int = 4  # tokens (after BOS) a context shift never discards
    stop: tuple[str, ...] = ()

    def sampler_seed(self) -> int:
        """The seed llama.cpp's sampler takes (a uint32, as Go's conversion makes Ollama's int64
        one); a random one for a negative seed."""
        return self.seed & 0xFFFFFFFF if self.seed >= 0 else random.randint(0, 2**31 - 1)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "SamplingOptions":
        """Ollama's option names are the field names; an absent option keeps its default above."""
        values: dict[str, Any] = {spec.name: type(spec.default)(options[spec.name])
                                  for spec in fields(cls) if spec.name in options and spec.name != "stop"}
        return cls(**values, stop=tuple(s for s in options.get("stop", ()) or () if s))


AUTO_SLOTS = -1


def take_logprobs(logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"logprobs": [...]}` with the entries gathered so far (emptying the list), or nothing."""
    if not logprobs:
        return {}
    taken = list(logprobs)
    logprobs.clear()
    return {"logprobs": taken}
