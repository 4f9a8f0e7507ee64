"""Continuous batching (on by default; BERTH_NUM_PARALLEL sets the slots) through a live server:
concurrent streams share a runner."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from berth.registry.default_model import DEFAULT_MODEL_NAME
from tests.conftest import BerthServer, start_server


@pytest.fixture
def batching_server(tmp_path: Path) -> BerthServer:
    srv = start_server(tmp_path / "models", tmp_path / "server.log",
                       {"BERTH_BATCHING": "1", "BERTH_NUM_PARALLEL": "3"})
    yield srv
    srv.stop()


def test_concurrent_requests_run_together_and_all_finish(batching_server: BerthServer) -> None:
    url = batching_server.url + "/api/generate"
    prompts = ["The sea is", "Mountains are", "In the city,"]
    results: dict[str, dict] = {}

    def run(prompt: str) -> None:
        body = {"model": DEFAULT_MODEL_NAME, "prompt": prompt, "raw": True, "stream": False,
                "options": {"num_predict": 16, "seed": 3}}
        results[prompt] = httpx.post(url, json=body, timeout=300).json()

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == sorted(prompts)
    for answer in results.values():
        assert answer["done"] and answer["eval_count"] == 16 and answer["done_reason"] == "length"
    running = httpx.get(batching_server.url + "/api/ps").json()["models"]
    assert len(running) == 1  # one runner served all three


def test_deterministic_mode_answers_a_seeded_request_alike_alone_or_among_others(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "models", tmp_path / "server.log",
                       {"BERTH_DETERMINISTIC": "1", "BERTH_NUM_PARALLEL": "4"})
    url = srv.url + "/api/generate"

    def generate(prompt: str, predict: int = 32) -> str:
        body = {"model": DEFAULT_MODEL_NAME, "prompt": prompt, "stream": False,
                "options": {"temperature": 0.9, "top_k": 40, "seed": 42, "num_predict": predict}}
        answer = httpx.post(url, json=body, timeout=300).json()
        assert answer["eval_count"] > 0, answer
        return answer["response"]

    try:
        prompt = "Tell me about the moon."
        alone = generate(prompt)
        assert generate(prompt) == alone  # again, with its prompt in the cache
        answers: dict[int, str] = {}

        def run(index: int, text: str, predict: int) -> None:
            answers[index] = generate(text, predict)

        others = ["Write a poem about rain.", "What is a prime number?", "Describe a forest at night."]
        threads = [threading.Thread(target=run, args=(0, others[0], 120))]  # already decoding
        threads[0].start()
        threads += [threading.Thread(target=run, args=(i, text, 32)) for i, text in enumerate(others[1:], 1)]
        threads.append(threading.Thread(target=run, args=(3, prompt, 32)))
        for thread in threads[1:]:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers[3] == alone
        assert len(set(answers.values())) == 4
    finally:
        srv.stop()


def test_embeddings_while_generations_run_equal_embeddings_alone(batching_server: BerthServer) -> None:
    url = batching_server.url
    inputs = ["The sea is calm tonight.", "A second sentence, about mountains."]

    def embed() -> list[list[float]]:
        answer = httpx.post(url + "/api/embed", json={"model": DEFAULT_MODEL_NAME, "input": inputs}, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()["embeddings"]

    alone = embed()
    assert len(alone) == 2 and len(alone[0]) > 100 and alone[0] != alone[1]
    streams: list[list[dict]] = []
    generating = threading.Semaphore(0)

    def generate(prompt: str) -> None:
        body = {"model": DEFAULT_MODEL_NAME, "prompt": prompt, "raw": True,
                "options": {"num_predict": 200, "temperature": 0}}
        events: list[dict] = []
        with httpx.stream("POST", url + "/api/generate", json=body, timeout=300) as response:
            for line in response.iter_lines():
                events.append(json.loads(line))
                if len(events) == 3:
                    generating.release()
        streams.append(events)

    threads = [threading.Thread(target=generate, args=(p,)) for p in ("Count to fifty:", "List some fruits:")]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert generating.acquire(timeout=120)  # both are decoding now
    during = embed()
    for thread in threads:
        thread.join()
    assert during == alone
    assert len(streams) == 2
    for events in streams:  # and they went on while the embeddings were computed
        assert events[-1]["done"] and events[-1]["done_reason"] in ("length", "stop")


def test_a_system_prompt_two_users_share_is_evaluated_once(batching_server: BerthServer) -> None:
    url = batching_server.url + "/api/chat"
    system = {"role": "system", "content": "You are a patient tutor. Answer in one short sentence. " * 8}

    def body(question: str, stream: bool) -> dict:
        return {"model": DEFAULT_MODEL_NAME, "stream": stream, "options": {"num_predict": 60, "temperature": 0},
                "messages": [system, {"role": "user", "content": question}]}

    with httpx.stream("POST", url, json=body("What is a noun?", True), timeout=120) as first:
        lines = first.iter_lines()
        for _ in range(3):
            next(lines)  # the first user's answer is being generated
        second = httpx.post(url, json=body("What is a verb?", False), timeout=120).json()
        events = [json.loads(line) for line in lines if line]
    first_done = events[-1]
    assert first_done["done"] and second["done"] and second["message"]["content"]
    assert first_done["prompt_eval_count"] > 100
    # The second evaluated only what follows the system prompt the first had already evaluated.
    assert second["prompt_eval_count"] < first_done["prompt_eval_count"] - 80


def test_json_format_and_a_disconnect_in_batched_mode(batching_server: BerthServer) -> None:
    url = batching_server.url + "/api/generate"
    with httpx.stream("POST", url, json={"model": DEFAULT_MODEL_NAME, "prompt": "Count:", "raw": True,
                                         "options": {"num_predict": 3000}}, timeout=120) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i == 2:
                break
    answer = httpx.post(url, json={"model": DEFAULT_MODEL_NAME, "prompt": "A JSON object about a dog:",
                                   "format": "json", "stream": False,
                                   "options": {"temperature": 0, "num_predict": 40}}, timeout=60).json()
    assert answer["response"].lstrip().startswith("{")
    if answer["done_reason"] == "stop":
        json.loads(answer["response"])


def test_a_burst_beyond_the_queue_gets_503s_and_the_server_keeps_serving(tmp_path: Path) -> None:
    server = start_server(tmp_path / "models", tmp_path / "server.log",
                          {"BERTH_NUM_PARALLEL": "2", "BERTH_MAX_QUEUE": "10", "BERTH_KEEP_ALIVE": "-1"})
    try:
        body = {"model": "gemma3:270m", "prompt": "Count to ten:", "raw": True, "stream": False,
                "options": {"num_predict": 16, "temperature": 0}}
        assert httpx.post(server.url + "/api/generate", json=body, timeout=120).status_code == 200  # loaded
        rss_before = _rss_kib(server.process.pid)
        answers: list[httpx.Response] = []
        lock = threading.Lock()

        def client() -> None:
            reply = httpx.post(server.url + "/api/generate", json=body, timeout=300)
            with lock:
                answers.append(reply)

        clients = [threading.Thread(target=client) for _ in range(100)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        statuses = [a.status_code for a in answers]
        assert set(statuses) <= {200, 503}
        # 2 running + 10 waiting at any moment: most of a burst of 100 is turned away at once ...
        assert statuses.count(503) >= 50 and statuses.count(200) >= 12
        assert all(a.json() == {"error": "server busy, please try again.  maximum pending requests exceeded"}
                   for a in answers if a.status_code == 503)
        assert all(a.json()["done"] and a.json()["eval_count"] > 0 for a in answers if a.status_code == 200)
        # ... nothing piles up, and the server goes on serving.
        assert _rss_kib(server.process.pid) < rss_before + 100 * 1024
        assert httpx.post(server.url + "/api/generate", json=body, timeout=120).status_code == 200
    finally:
        server.stop()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_logprobs_request_runs_batched_and_holds_up_nobody(batching_server: BerthServer) -> None:
    """Logprobs are computed in the batch: a request sent while a long logprobs generation streams
    is answered before it ends (one generated apart would keep everyone waiting until it ends)."""
    url = batching_server.url + "/api/generate"
    long_body = {"model": DEFAULT_MODEL_NAME, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "raw": True,
                 "logprobs": True, "top_logprobs": 2, "options": {"temperature": 0, "num_predict": 160}}
    short_done = threading.Event()
    chunks: list[dict] = []
    tokens_after_short: list[int] = []
    with httpx.stream("POST", url, json=long_body, timeout=300) as response:
        for line in response.iter_lines():
            chunk = json.loads(line)
            chunks.append(chunk)
            if len(chunks) == 1:
                def short() -> None:
                    body = {"model": DEFAULT_MODEL_NAME, "prompt": "The sea is", "raw": True, "stream": False,
                            "options": {"num_predict": 4, "seed": 1}}
                    assert httpx.post(url, json=body, timeout=300).json()["eval_count"] == 4
                    short_done.set()

                threading.Thread(target=short).start()
            elif short_done.is_set():
                tokens_after_short.append(len(chunk.get("logprobs", ())))
    final = chunks[-1]
    assert final["done"] and final["eval_count"] == 160
    entries = [e for c in chunks for e in c.get("logprobs", ())]
    assert len(entries) == 160 and all(len(e["top_logprobs"]) == 2 for e in entries)
    assert short_done.is_set() and sum(tokens_after_short) > 0  # the long one was still going


def test_logprobs_are_the_same_with_batching_off(batching_server: BerthServer, tmp_path: Path) -> None:
    """BERTH_BATCHING=0 generates one request at a time through llama-cpp-python's own loop; its
    logprob entries for a greedy request are the batch engine's (the same logits, the same math)."""
    body = {"model": DEFAULT_MODEL_NAME, "prompt": "The capital of France is", "raw": True, "stream": False,
            "logprobs": True, "top_logprobs": 3, "options": {"temperature": 0, "num_predict": 8}}
    batched = httpx.post(batching_server.url + "/api/generate", json=body, timeout=300).json()
    unbatched_server = start_server(tmp_path / "unbatched", tmp_path / "unbatched.log", {"BERTH_BATCHING": "0"})
    try:
        alone = httpx.post(unbatched_server.url + "/api/generate", json=body, timeout=300).json()
    finally:
        unbatched_server.stop()
    assert batched["response"] == alone["response"] and len(batched["logprobs"]) == len(alone["logprobs"]) == 8
    for ours, theirs in zip(batched["logprobs"], alone["logprobs"]):
        assert ours["token"] == theirs["token"] and ours["bytes"] == theirs["bytes"]
        assert abs(ours["logprob"] - theirs["logprob"]) < 0.01
        assert [t["token"] for t in ours["top_logprobs"]] == [t["token"] for t in theirs["top_logprobs"]]


def test_a_long_embedding_request_holds_up_no_generation(batching_server: BerthServer) -> None:
    """Embeddings run on a thread and context of their own in the runner: a generation sent while a
    long batch of inputs is being embedded is answered before that batch is done."""
    inputs = [f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog while the rain falls. " * 12
              for i in range(12)]
    order: list[str] = []
    started = threading.Event()

    def embed() -> None:
        started.set()
        reply = httpx.post(batching_server.url + "/api/embed", json={"model": DEFAULT_MODEL_NAME, "input": inputs},
                           timeout=300)
        assert len(reply.json()["embeddings"]) == len(inputs), reply.text
        order.append("embed")

    # The model is loaded first, so the embedding request starts its work at once.
    httpx.post(batching_server.url + "/api/generate", json={"model": DEFAULT_MODEL_NAME}, timeout=300)
    thread = threading.Thread(target=embed)
    thread.start()
    started.wait()
    time.sleep(0.5)  # the embedding request is in the runner by now (it takes seconds)
    body = {"model": DEFAULT_MODEL_NAME, "prompt": "The sea is", "raw": True, "stream": False,
            "options": {"num_predict": 4, "seed": 1}}
    assert httpx.post(batching_server.url + "/api/generate", json=body, timeout=300).json()["eval_count"] == 4
    order.append("generate")
    thread.join()
    assert order == ["generate", "embed"]


def test_without_batching_a_chat_burst_is_turned_away_while_a_generation_runs(tmp_path: Path) -> None:
    """One generation at a time (BERTH_BATCHING=0) and a queue of 2. A chat counts its tokens
    before it queues for the slot; when the runner answered that only between generations, every
    chat of a burst waited there, unbounded, and none got its 503 until the generation ended."""
    server = start_server(tmp_path / "models", tmp_path / "server.log",
                          {"BERTH_BATCHING": "0", "BERTH_MAX_QUEUE": "2", "BERTH_KEEP_ALIVE": "-1"})
    try:
        short = {"model": "gemma3:270m", "prompt": "hi", "options": {"num_predict": 1}}
        assert httpx.post(server.url + "/api/generate", json=short, timeout=120).status_code == 200  # loaded
        ended: dict[str, float] = {}
        answers: list[tuple[int, float]] = []
        lock = threading.Lock()
        streaming = threading.Event()
        release = threading.Event()

        def long_generation() -> None:
            # Held open until the burst has its answers (a GPU writes 400 tokens in under a second),
            # then left: the disconnect ends it.
            body = {"model": "gemma3:270m", "prompt": "1, 2, 3,", "raw": True,
                    "options": {"num_predict": 3000, "temperature": 0}}
            with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=300) as reply:
                assert reply.status_code == 200
                for line in reply.iter_lines():
                    streaming.set()
                    if release.is_set() or json.loads(line).get("done"):
                        break
            ended["long"] = time.monotonic()

        def chat() -> None:
            body = {"model": "gemma3:270m", "stream": False, "options": {"num_predict": 1},
                    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
            reply = httpx.post(server.url + "/api/chat", json=body, timeout=300)
            with lock:
                answers.append((reply.status_code, time.monotonic()))

        running = threading.Thread(target=long_generation)
        running.start()
        assert streaming.wait(120)  # the generation holds the one slot
        burst = [threading.Thread(target=chat) for _ in range(8)]
        for thread in burst:
            thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(status == 503 for status, _ in answers) < 5:
            time.sleep(0.05)
        release.set()
        for thread in burst + [running]:
            thread.join()
        busy = [when for status, when in answers if status == 503]
        assert {status for status, _ in answers} <= {200, 503} and len(busy) >= 5  # 1 slot + 2 places
        assert all(when < ended["long"] for when in busy)  # turned away at once, not after the generation
    finally:
        server.stop()
