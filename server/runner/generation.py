"""Rules both generation paths of a runner share (llama-cpp-python's own loop for one request at
a time, and the batch engine): log-probability entries, stop strings, and the context shift."""

from __future__ import annotations

from typing import Any, Callable


def logprob_entry(logits_row: Any, n_vocab: int, token: int, top_n: int,
                  text_of: Callable[[int], bytes]) -> dict[str, Any]:
    """Ollama's logprob entry for a sampled token: log-softmax of the model's raw logits (before any
    sampling transform) at `logits_row` (a llama.cpp float pointer), plus the `top_n` likeliest
    tokens at that position; `text_of` gives a token's bytes, special tokens included."""
    import numpy as np

    logits = np.ctypeslib.as_array(logits_row, shape=(n_vocab,))
    peak = float(logits.max())
    log_total = peak + float(np.log(np.exp(logits - peak).sum()))

    def entry(candidate: int) -> dict[str, Any]:
        data = text_of(candidate)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": float(logits[candidate]) - log_total,
                "bytes": list(data)}

    chosen = entry(token)
    if top_n > 0:
        # An argmax per alternative (at most 20): over a 262k vocabulary several times faster than
        # argpartition, and this runs inside an engine step every sequence shares.
        rest = logits.copy()
        best = []
        for _ in range(top_n):
            best.append(int(rest.argmax()))
            rest[best[-1]] = -np.inf
        chosen["top_logprobs"] = [entry(t) for t in best]
    return chosen


def shifted(window: list[int], num_keep: int, bos: bool) -> list[int]:
    """The context after a shift, as llama.cpp's runners do it: keep BOS and the first `num_keep`
    tokens, drop the older half of the rest. At most half the window is kept, whatever `num_keep`
    says: a `num_keep` near or past the context would otherwise leave nothing (or next to nothing)
    to drop, and the window would be evaluated again on every token, growing past its slot."""
    keep = min(len(window) // 2, max(0, num_keep) + int(bos))
    discard = (len(window) - keep) // 2
    return window[:keep] + window[keep + discard:]


def split_at_stop(text: str, stops: list[str]) -> tuple[str, str, bool]:
    """Split decoded text into (safe to emit, held back, stop seen).

    Text that ends with a proper prefix of a stop string is held back until it either completes
    the stop (which is then dropped, with everything after it) or diverges.
    """
    if not stops:
        return text, "", False
    for stop in stops:
        index = text.find(stop)
        if index >= 0:
            return text[:index], "", True
    hold = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                hold = max(hold, length)
                break
    return (text[:-hold], text[-hold:], False) if hold else (text, "", False)
