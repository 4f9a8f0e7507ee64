"""What a GPU host must show, checked against a live Berth server built with a GPU backend.

    .venv/bin/python bench/gpu_check.py [--url http://127.0.0.1:11434] [--model gemma3:270m]

Checks, each printed PASS or FAIL with its figures (exit status 1 if any failed):
- the model loads with every layer offloaded: `/api/ps` size_vram equals its size (`100% GPU`);
- decode speed of one stream, and the aggregate of 4 and 8 concurrent streams;
- `num_gpu` K offloads part of it (size_vram between 0 and the size), `num_gpu` 0 none of it;
- a seeded request's text alone and among three others (equal only under BERTH_DETERMINISTIC=1 on
  GPU backends, which choose their kernels by batch size; reported, not failed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import httpx


class Host:
    def __init__(self, url: str, model: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=300)
        self.model = model

    def generate(self, prompt: str, **options: Any) -> dict[str, Any]:
        body = {"model": self.model, "prompt": prompt, "stream": False, "options": options}
        reply = self.http.post("/api/generate", json=body)
        reply.raise_for_status()
        return reply.json()

    def placement(self) -> tuple[int, int]:
        """(size, size_vram) of the loaded model."""
        entry = next(m for m in self.http.get("/api/ps").json()["models"] if m["model"] == self.model)
        return entry["size"], entry["size_vram"]


def decode_rate(answer: dict[str, Any]) -> float:
    return answer["eval_count"] / (answer["eval_duration"] / 1e9)


def concurrent(host: Host, n: int, tokens: int) -> str:
    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda i: host.generate(f"Story {i}: once upon a time", num_predict=tokens,
                                                        seed=100 + i), range(n)))
    wall = time.perf_counter() - started
    generated = sum(a["eval_count"] for a in answers)
    return f"{n} streams, {generated} tokens in {wall:.2f} s: {generated / wall:.0f} tokens/s together"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://" + os.environ.get("BERTH_HOST", "127.0.0.1:11434"))
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument("--partial", type=int, default=9, help="num_gpu for the partial offload check")
    args = parser.parse_args()
    host = Host(args.url, args.model)
    failed: list[str] = []

    def check(name: str, run: Callable[[], str]) -> None:
        try:
            print(f"PASS {name}: {run()}")
        except Exception as exc:  # noqa: BLE001 - every check runs and reports
            failed.append(name)
            print(f"FAIL {name}: {exc}")

    def offloaded() -> str:
        answer = host.generate("Why is the sky blue?", num_predict=32, seed=1, num_gpu=-1)
        size, vram = host.placement()
        if vram != size:
            raise AssertionError(f"size_vram {vram} of {size}: not all on the GPU (does llama.cpp have a GPU "
                                 "backend? the server's log says which devices it found)")
        return f"{vram} bytes on the GPU, loaded in {answer['load_duration'] / 1e9:.2f} s"

    def one_stream() -> str:
        answer = host.generate("Why is the sky blue?", num_predict=256, seed=2)
        return f"{answer['eval_count']} tokens at {decode_rate(answer):.0f} tokens/s"

    def partial() -> str:
        host.generate("Hello", num_predict=8, num_gpu=args.partial)
        size, vram = host.placement()
        if not 0 < vram < size:
            raise AssertionError(f"num_gpu {args.partial}: size_vram {vram} of {size}")
        return f"num_gpu {args.partial}: {vram / size:.0%} on the GPU"

    def cpu_only() -> str:
        answer = host.generate("Hello", num_predict=32, num_gpu=0)
        size, vram = host.placement()
        if vram != 0:
            raise AssertionError(f"num_gpu 0: size_vram {vram} of {size}")
        return f"num_gpu 0: on the CPU at {decode_rate(answer):.0f} tokens/s"

    def seeded() -> str:
        options = {"seed": 7, "temperature": 0.8, "num_predict": 48}
        alone = host.generate("Why is the sky blue?", **options)["response"]
        with ThreadPoolExecutor(4) as pool:
            among = pool.submit(host.generate, "Why is the sky blue?", **options)
            for i in range(3):
                pool.submit(host.generate, f"Other {i}", seed=50 + i, num_predict=96)
            text = among.result()["response"]
        return "the same text alone and among three others" if text == alone else \
            "a different text among three others (expected without BERTH_DETERMINISTIC=1)"

    check("every layer on the GPU", offloaded)
    check("one stream", one_stream)
    check("4 concurrent", lambda: concurrent(host, 4, 128))
    check("8 concurrent", lambda: concurrent(host, 8, 128))
    check("seeded request", seeded)
    check("partial offload", partial)
    check("no offload", cpu_only)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
