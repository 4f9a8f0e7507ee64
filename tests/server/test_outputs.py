"""The 0.12 request flags that shape a generation's output: logprobs, _debug_render_only, shift."""

from __future__ import annotations

import json
from typing import Any

import httpx

MODEL = "gemma3:270m"
GREEDY = {"temperature": 0, "seed": 1}


def test_logprobs_for_every_token_with_the_likeliest_alternatives(http: httpx.Client) -> None:
    reply = http.post("/api/generate", json={
        "model": MODEL, "prompt": "The capital of France is", "raw": True, "stream": False,
        "logprobs": True, "top_logprobs": 3, "options": {**GREEDY, "num_predict": 6}}).json()
    entries = reply["logprobs"]
    assert len(entries) == reply["eval_count"] == 6
    assert "".join(e["token"] for e in entries) == reply["response"]
    for entry in entries:
        assert entry["logprob"] <= 0 and bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
        top = entry["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # Greedy decoding picks the likeliest token, so it heads its own list.
        assert top[0]["token"] == entry["token"] and abs(top[0]["logprob"] - entry["logprob"]) < 1e-6
    # A distribution: the alternatives' probabilities cannot add up to more than 1.
    assert sum(2.718281828 ** t["logprob"] for t in entries[0]["top_logprobs"]) <= 1.0 + 1e-6


def test_logprobs_stream_with_their_chunks_and_in_chat(http: httpx.Client) -> None:
    chunks: list[dict[str, Any]] = []
    with http.stream("POST", "/api/chat", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "logprobs": True,
            "options": {**GREEDY, "num_predict": 5}}) as response:
        for line in response.iter_lines():
            chunks.append(json.loads(line))
    final = chunks[-1]
    streamed = [e for c in chunks for e in c.get("logprobs", [])]
    assert final["done"] and len(streamed) == final["eval_count"]
    assert all("top_logprobs" not in e for e in streamed)  # top_logprobs 0: the chosen token only
    plain = http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False,
                                             "options": {"num_predict": 2}}).json()
    assert "logprobs" not in plain


def test_top_logprobs_out_of_range_is_a_400(http: httpx.Client) -> None:
    for value in (21, -1):
        reply = http.post("/api/generate", json={"model": MODEL, "prompt": "x", "logprobs": True,
                                                 "top_logprobs": value})
        assert reply.status_code == 400 and reply.json() == {"error": "top_logprobs must be between 0 and 20"}


def test_debug_render_only_returns_the_prompt_and_generates_nothing(http: httpx.Client) -> None:
    reply = http.post("/api/generate", json={"model": MODEL, "prompt": "Why is the sky blue?", "stream": False,
                                             "system": "Be brief.", "_debug_render_only": True}).json()
    rendered = reply["_debug_info"]["rendered_template"]
    assert "Why is the sky blue?" in rendered and "Be brief." in rendered and "<start_of_turn>user" in rendered
    assert reply["done"] is False and reply["response"] == "" and "eval_count" not in reply
    raw = http.post("/api/generate", json={"model": MODEL, "prompt": "as is", "raw": True,
                                           "_debug_render_only": True}).json()
    assert raw["_debug_info"] == {"rendered_template": "as is"}
    chat = http.post("/api/chat", json={"model": MODEL, "stream": False, "_debug_render_only": True, "messages": [
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"},
        {"role": "user", "content": "How are you?"}]}).json()
    text = chat["_debug_info"]["rendered_template"]
    assert text.index("Hello") < text.index("Hi there!") < text.index("How are you?")
    assert chat["message"] == {"role": "", "content": ""} and chat["done"] is False


def test_a_full_context_shifts_unless_shift_is_false(http: httpx.Client) -> None:
    prompt = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
    options = {**GREEDY, "num_ctx": 256, "num_predict": 300, "repeat_penalty": 1.0}
    body = {"model": MODEL, "prompt": prompt, "template": "{{ .Prompt }}", "stream": False, "options": options}
    shifted = http.post("/api/generate", json=body).json()
    stopped = http.post("/api/generate", json={**body, "shift": False}).json()
    loaded = [m for m in http.get("/api/ps").json()["models"] if m["name"] == MODEL]
    # Without a shift the answer ends where the context is full; with one it runs to num_predict.
    assert stopped["done_reason"] == "length" and len(stopped["context"]) == loaded[0]["context_length"]
    assert stopped["eval_count"] < 300
    assert shifted["done_reason"] == "length" and shifted["eval_count"] == 300
    assert shifted["response"].startswith(stopped["response"])


def test_openai_chat_logprobs_through_the_official_client(server: Any) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                           logprobs=True, top_logprobs=2, max_tokens=4, temperature=0, seed=1)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                            logprobs=True, max_tokens=4, temperature=0, seed=1, stream=True)
    streamed = [t for event in stream for choice in event.choices if choice.logprobs for t in choice.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
