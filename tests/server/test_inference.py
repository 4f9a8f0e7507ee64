"""Generate, chat, embed and ps against a live server running the real default model.

Sampling is greedy (temperature 0) where output is compared, so the assertions are exact.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import ollama
import pytest

from berth.registry.default_model import DEFAULT_MODEL_NAME
from tests.conftest import BerthServer, start_server

MODEL = DEFAULT_MODEL_NAME
GREEDY = {"temperature": 0, "num_predict": 12, "seed": 7}


@pytest.fixture(scope="module")
def client(server: BerthServer) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=300)


def runner_pids(server: BerthServer) -> list[int]:
    """Runner processes are children of the server process (of any of its threads)."""
    pids = [int(pid) for children in Path(f"/proc/{server.process.pid}/task").glob("*/children")
            for pid in children.read_text().split()]
    return [pid for pid in pids if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def kill_runner_while_streaming(server: BerthServer, body: dict, after_lines: int) -> list[dict]:
    """Stream a generation, SIGKILL the server's runners once `after_lines` lines came, and return
    every line the stream gave."""
    lines: list[dict] = []
    with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            lines.append(json.loads(line))
            if len(lines) == after_lines:
                for pid in runner_pids(server):
                    os.kill(pid, signal.SIGKILL)
    return lines


RAW_BASELINE = textwrap.dedent(
    """
    import json, sys
    import llama_cpp
    llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=4096, flash_attn=True, verbose=False)  # as Berth runs it
    ids = llm.tokenize(sys.argv[2].encode(), add_bos=True, special=True)
    out = []
    for tok in llm.generate(ids, temp=0.0, reset=True):
        if tok == llm.token_eos() or len(out) == int(sys.argv[3]):
            break
        out.append(tok)
    print(json.dumps(llm.detokenize(out).decode("utf-8", errors="replace")))
    """
)


def test_raw_generate_matches_llama_cpp_python(client: ollama.Client, server: BerthServer) -> None:
    prompt = "The three primary colors are"
    # A fresh runner: in the default (not batch-invariant) mode, the cells other requests left in
    # the KV buffer can change how a near-tie rounds (BERTH_DETERMINISTIC is the mode that rules it out).
    client.generate(model=MODEL, keep_alive=0)
    response = client.generate(model=MODEL, prompt=prompt, raw=True, options=GREEDY, stream=False)
    blob = next(p for p in (server.models_dir / "blobs").iterdir() if p.stat().st_size > 100_000_000)
    expected = json.loads(subprocess.run([sys.executable, "-c", RAW_BASELINE, str(blob), prompt, "12"],
                                         check=True, capture_output=True, text=True).stdout)
    assert response.response == expected
    assert response.done and response.done_reason == "length"
    assert response.eval_count == 12
    assert response.context is None or response.context == []  # raw answers carry no context


def test_generate_streams_chunks_and_final_statistics(client: ollama.Client) -> None:
    chunks = list(client.generate(model=MODEL, prompt="Write a word.", options=GREEDY, stream=True))
    assert len(chunks) >= 2 and all(not c.done for c in chunks[:-1])
    final = chunks[-1]
    assert final.done and final.done_reason in ("stop", "length") and final.response == ""
    assert final.total_duration and final.total_duration >= final.eval_duration > 0
    assert final.prompt_eval_count and final.prompt_eval_count > 5
    assert final.eval_count == len([c for c in chunks[:-1] if c.response]) or final.eval_count >= 1
    assert final.context and len(final.context) >= final.prompt_eval_count
    non_stream = client.generate(model=MODEL, prompt="Write a word.", options=GREEDY, stream=False)
    assert non_stream.response == "".join(c.response for c in chunks)


def test_context_continues_a_conversation(client: ollama.Client) -> None:
    first = client.generate(model=MODEL, prompt="My name is Ada.", options=GREEDY)
    second = client.generate(model=MODEL, prompt="What is my name?", context=first.context, options=GREEDY)
    assert second.prompt_eval_count and second.context and len(second.context) > len(first.context or [])


def test_chat_uses_the_template_and_system_prompt(client: ollama.Client, server: BerthServer) -> None:
    messages = [{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "What color is the sky?"}]
    answer = client.chat(model=MODEL, messages=messages, options=GREEDY, stream=False)
    assert answer.message.role == "assistant" and answer.message.content
    assert answer.done_reason in ("stop", "length")
    streamed = list(client.chat(model=MODEL, messages=messages, options=GREEDY, stream=True))
    assert "".join(c.message.content for c in streamed) == answer.message.content
    # Same text through raw generate with the prompt Gemma's template produces: the template was used.
    prompt = ("<start_of_turn>user\nAnswer with one word.\n\nWhat color is the sky?<end_of_turn>\n"
              "<start_of_turn>model\n")
    raw = client.generate(model=MODEL, prompt=prompt, raw=True, options={**GREEDY, "stop": ["<end_of_turn>"]})
    assert raw.response == answer.message.content


def test_json_format_is_enforced(client: ollama.Client) -> None:
    answer = client.generate(model=MODEL, prompt="Give me a JSON object describing a cat.", format="json",
                             options={"temperature": 0, "num_predict": 60})
    text = answer.response.strip()
    assert text.startswith("{")
    if answer.done_reason == "stop":
        json.loads(text)
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    answer = client.generate(model=MODEL, prompt="How old is the cat? Reply in JSON.", format=schema,
                             options={"temperature": 0, "num_predict": 40})
    assert isinstance(json.loads(answer.response)["age"], int)


def test_embed_is_normalised_and_legacy_embeddings_are_not(client: ollama.Client) -> None:
    result = client.embed(model=MODEL, input=["hello world", "good night"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) == 640
    for vector in result.embeddings:
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-4)
    assert result.embeddings[0] != result.embeddings[1]
    cut = client.embed(model=MODEL, input="hello world", dimensions=64)
    assert len(cut.embeddings[0]) == 64
    assert math.isclose(math.sqrt(sum(x * x for x in cut.embeddings[0])), 1.0, rel_tol=1e-4)
    legacy = client.embeddings(model=MODEL, prompt="hello world")
    norm = math.sqrt(sum(x * x for x in legacy.embedding))
    assert not math.isclose(norm, 1.0, rel_tol=1e-3)
    assert math.isclose(legacy.embedding[0] / norm, result.embeddings[0][0], rel_tol=1e-3, abs_tol=1e-5)


def test_ps_reports_the_loaded_model_on_cpu(client: ollama.Client) -> None:
    client.generate(model=MODEL, prompt="", keep_alive="10m")
    running = client.ps().models
    entry = next(m for m in running if m.model == MODEL)
    assert entry.size_vram == 0 and entry.size and entry.size > 200_000_000
    assert entry.digest and len(entry.digest) == 64
    assert entry.context_length == 4096
    assert entry.expires_at is not None


def test_empty_prompt_loads_and_keep_alive_zero_unloads(fresh_server: BerthServer) -> None:
    server = fresh_server
    http = httpx.Client(base_url=server.url, timeout=120)
    loaded = http.post("/api/generate", json={"model": MODEL}).json()
    assert loaded["done"] and loaded["done_reason"] == "load" and loaded["response"] == ""
    assert runner_pids(server)
    unloaded = http.post("/api/generate", json={"model": MODEL, "keep_alive": 0}).json()
    assert unloaded["done_reason"] == "unload"
    assert all(m["model"] != MODEL for m in http.get("/api/ps").json()["models"])
    deadline = time.monotonic() + 10
    while runner_pids(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runner_pids(server) == []  # the process is gone, so its memory is freed
    chat = http.post("/api/chat", json={"model": MODEL, "messages": []}).json()
    assert chat["done_reason"] == "load" and chat["message"] == {"role": "assistant", "content": ""}


@pytest.mark.parametrize(
    "path,body,status,message",
    [
        ("/api/generate", {"model": "missing:1", "prompt": "hi"}, 404, "model 'missing:1' not found"),
        ("/api/generate", {"prompt": "hi"}, 400, "model is required"),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "raw": True, "system": "x"}, 400,
         "raw mode does not support template, system, or context"),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "images": ["aGVsbG8="]}, 400, "does not support images"),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "images": ["***"]}, 400, "not valid base64"),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "format": "xml"}, 400, "invalid format"),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "keep_alive": "300"}, 400, "missing unit"),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "keep_alive": [1]}, 400, "Unsupported type"),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"top_k": "many"}}, 400,
         'option "top_k" must be of type integer'),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                       "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "does not support tools"),
        ("/api/chat", {"model": MODEL, "messages": "hi"}, 400, 'invalid value for "messages"'),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "think": True}, 400,
         f'"{MODEL}" does not support thinking'),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "think": "extreme"}, 400, "invalid think value"),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "format": {"type": "object", "properties": {
            "a": {"$ref": "#/$defs/missing"}}}}, 400, "invalid format"),
        ("/api/embed", {"model": MODEL, "input": [1, 2]}, 400, "invalid input type"),
        ("/api/embed", {"model": "missing:1", "input": "x"}, 404, "not found"),
    ],
)
def test_bad_requests(http: httpx.Client, path: str, body: dict, status: int, message: str) -> None:
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_unknown_options_are_accepted(client: ollama.Client) -> None:
    answer = client.generate(model=MODEL, prompt="hi", options={**GREEDY, "num_predict": 2, "mirostat": 1,
                                                                "no_such_option": True})
    assert answer.done


def test_prompt_longer_than_the_context_is_a_clear_error(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "word " * 300, "raw": True, "stream": False,
            "options": {"num_ctx": 128, "num_predict": 4}}
    response = http.post("/api/generate", json=body)
    assert response.status_code == 400 and "does not fit the context" in response.json()["error"]


def test_long_chat_history_is_trimmed_to_fit(client: ollama.Client) -> None:
    history = []
    for i in range(40):
        history += [{"role": "user", "content": f"Tell me fact number {i} about the sea."},
                    {"role": "assistant", "content": "The sea is large and deep and full of life. " * 3}]
    history.append({"role": "user", "content": "Thanks!"})
    answer = client.chat(model=MODEL, messages=history, options={**GREEDY, "num_ctx": 512, "num_predict": 4})
    assert answer.done and answer.prompt_eval_count and answer.prompt_eval_count <= 512


def test_a_killed_runner_becomes_a_clean_error_and_the_next_request_works(fresh_server: BerthServer) -> None:
    url = fresh_server.url + "/api/generate"
    body = {"model": MODEL, "prompt": "Count from one to one thousand:", "options": {"num_predict": 2000}}
    lines = kill_runner_while_streaming(fresh_server, body, 3)
    assert "error" in lines[-1] and "runner" in lines[-1]["error"]
    again = httpx.post(url, json={"model": MODEL, "prompt": "hi", "stream": False,
                                  "options": {"num_predict": 3}}, timeout=120)
    assert again.status_code == 200 and again.json()["done"]


def test_clients_that_disconnect_stop_their_generations(tmp_path: Path) -> None:
    """Two streams fill both slots, read a few tokens and leave. Their generations could run for
    100,000 tokens (minutes even on a GPU), so a request sent next is answered only if leaving
    freed the slots."""
    srv = start_server(tmp_path / "models", tmp_path / "server.log", {"BERTH_NUM_PARALLEL": "2"})
    try:
        url = srv.url + "/api/generate"
        endless = {"model": MODEL, "prompt": "1, 2, 3,", "raw": True, "options": {"num_predict": 100_000}}
        with httpx.stream("POST", url, json=endless, timeout=120) as first, \
                httpx.stream("POST", url, json=endless, timeout=120) as second:
            for response in (first, second):
                lines = response.iter_lines()
                assert not any(json.loads(next(lines))["done"] for _ in range(3))
        again = httpx.post(url, json={"model": MODEL, "prompt": "hi", "stream": False,
                                      "options": {"num_predict": 2}}, timeout=30).json()
        assert again["done"] and again["eval_count"] <= 2
    finally:
        srv.stop()


def test_full_queue_answers_503(tmp_path: Path) -> None:
    """BERTH_MAX_QUEUE=0: nothing waits. The request that loads the model is served (it waits behind
    nobody); one that would wait for the only slot gets 503 at once."""
    srv = start_server(tmp_path / "models", tmp_path / "server.log",
                       {"BERTH_MAX_QUEUE": "0", "BERTH_NUM_PARALLEL": "1", "BERTH_KEEP_ALIVE": "-1"})
    try:
        short = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 1}}
        assert httpx.post(srv.url + "/api/generate", json=short, timeout=120).status_code == 200
        long = {"model": MODEL, "prompt": "1, 2, 3,", "raw": True, "options": {"num_predict": 2000, "temperature": 0}}
        with httpx.stream("POST", srv.url + "/api/generate", json=long, timeout=120) as running:
            assert running.status_code == 200
            # Generating, so the one slot is taken. (The iterator is kept: dropping it would close
            # the response, and the server would end a generation nobody reads.)
            lines = running.iter_lines()
            assert not json.loads(next(lines))["done"]
            response = httpx.post(srv.url + "/api/generate", json=short, timeout=60)
        assert response.status_code == 503
        assert response.json()["error"] == "server busy, please try again.  maximum pending requests exceeded"
    finally:
        srv.stop()
