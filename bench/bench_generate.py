"""Single-stream decode through Berth's /api/generate against raw llama-cpp-python, in one run.

Both sides load the default model's GGUF with the same context, batch and thread count, and decode
the same raw prompt greedily for the same number of tokens. Printed: decode tokens/s of each and
their ratio, time to first token of each and Berth's overhead, and server start-to-ready time.

    .venv/bin/python bench/bench_generate.py [--tokens 128] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from berth.server.runner.placement import physical_cores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time, in a small village by the sea, there lived"
NUM_CTX = 4096
NUM_BATCH = 512

RAW = textwrap.dedent(
    """
    import json, sys, time
    import llama_cpp
    path, prompt, tokens, repeat, n_ctx, n_batch, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, n_threads_batch=threads,
                          flash_attn=True, verbose=False)  # as Berth runs it
    runs = []  # like Berth's runner, generate() reuses the cached prompt prefix between runs
    for i in range(repeat + 1):
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        start = time.perf_counter()
        first = None
        count = 0
        for tok in llm.generate(ids, temp=0.0, top_k=40, top_p=0.9, min_p=0.0, repeat_penalty=1.0, reset=True):
            now = time.perf_counter()
            if first is None:
                first = now
            count += 1
            if count >= tokens:
                break
        end = time.perf_counter()
        if i:  # the first run warms caches
            runs.append({"ttft": first - start, "decode_tps": (count - 1) / (end - first), "count": count})
    print(json.dumps(runs))
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(models: Path) -> tuple[subprocess.Popen[bytes], str, float]:
    port = free_port()
    env = {**os.environ, "BERTH_MODELS": str(models), "BERTH_HOST": f"127.0.0.1:{port}"}
    berth = Path(sys.executable).parent / "berth"
    started = time.perf_counter()
    proc = subprocess.Popen([str(berth), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/", timeout=0.5).status_code == 200:
                return proc, url, time.perf_counter() - started
        except httpx.HTTPError:
            time.sleep(0.01)
        if proc.poll() is not None or time.perf_counter() - started > 120:
            raise SystemExit("berth serve did not start")


def berth_run(http: httpx.Client, tokens: int, threads: int) -> dict[str, float]:
    body = {"model": "gemma3:270m", "prompt": PROMPT, "raw": True, "stream": True,
            "options": {"temperature": 0, "num_predict": tokens, "num_ctx": NUM_CTX, "num_batch": NUM_BATCH,
                        "num_thread": threads, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.0}}
    start = time.perf_counter()
    first = None
    final: dict[str, float] = {}
    with http.stream("POST", "/api/generate", json=body) as response:
        for line in response.iter_lines():
            chunk = json.loads(line)
            if first is None:
                first = time.perf_counter()
            if chunk.get("done"):
                final = chunk
    assert first is not None and final, "no output"
    count = final["eval_count"]
    decode = (count - 1) / ((final["eval_duration"]) / 1e9)
    return {"ttft": first - start, "decode_tps": decode, "count": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=physical_cores(),
                        help="for both sides (default: Berth's own default, the physical cores)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        proc, url, first_start = start_server(models)  # imports the default model
        proc.terminate()
        proc.wait()
        proc, url, ready = start_server(models)
        try:
            blob = max((models / "blobs").iterdir(), key=lambda p: p.stat().st_size)
            raw_runs = json.loads(subprocess.run(
                [sys.executable, "-c", RAW, str(blob), PROMPT, str(args.tokens), str(args.repeat), str(NUM_CTX),
                 str(NUM_BATCH), str(args.threads)], check=True, capture_output=True, text=True).stdout)
            # One client for all requests, as the ollama and openai clients keep theirs: creating an
            # httpx client per request costs ~20 ms of its own (SSL context) and is not Berth's time.
            with httpx.Client(base_url=url, timeout=300) as http:
                berth_run(http, args.tokens, args.threads)  # load the model and warm up
                berth_runs = [berth_run(http, args.tokens, args.threads) for _ in range(args.repeat)]
        finally:
            proc.terminate()
            proc.wait()
    raw_tps = statistics.median(r["decode_tps"] for r in raw_runs)
    berth_tps = statistics.median(r["decode_tps"] for r in berth_runs)
    raw_ttft = statistics.median(r["ttft"] for r in raw_runs) * 1000
    berth_ttft = statistics.median(r["ttft"] for r in berth_runs) * 1000
    print(f"model: gemma3:270m, {args.tokens} tokens, greedy, num_ctx {NUM_CTX}, {args.threads} threads, "
          f"median of {args.repeat}")
    print(f"raw llama-cpp-python decode: {raw_tps:.1f} tok/s   time to first token: {raw_ttft:.1f} ms")
    print(f"berth /api/generate decode:  {berth_tps:.1f} tok/s   time to first token: {berth_ttft:.1f} ms")
    print(f"decode ratio berth/raw: {berth_tps / raw_tps:.3f}")
    print(f"time-to-first-token overhead: {berth_ttft - raw_ttft:+.1f} ms")
    print(f"server start to ready: {ready:.2f} s (first start, importing the default model: {first_start:.2f} s)")


if __name__ == "__main__":
    main()
