"""The OpenAI-compatible API (spec §4) through the clients people use: the official `openai`
package and `langchain-ollama`, against a live server running the real default model.

Sampling is greedy (temperature 0, fixed seed) where texts are compared, so assertions are exact.
The pure translation (server/openai_shapes.py) is also tested directly, for what the default model
cannot show (it has no tools capability and no vision projector).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from typing import Any, AsyncIterator, Iterator

import httpx
import ollama
import openai
import pytest
from fastapi.responses import StreamingResponse
from langchain_ollama import ChatOllama, OllamaEmbeddings

from berth.registry.default_model import DEFAULT_MODEL_NAME
from berth.registry.errors import InvalidInput
from berth.server import openai_shapes as shapes
from berth.server.api import openai as openai_routes
from berth.server.runner.client import RunnerError
from tests.conftest import BerthServer

MODEL = DEFAULT_MODEL_NAME
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 7, "max_tokens": 12}
QUESTION = [{"role": "user", "content": "What color is the sky?"}]


@pytest.fixture(scope="module")
def client(server: BerthServer) -> Iterator[openai.OpenAI]:
    # No retries: a status that would be retried (5xx) should fail the test, not be hidden.
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300) as oai:
        yield oai


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


# -- chat completions ------------------------------------------------------------------------------


def test_chat_stream_joins_to_the_non_stream_answer(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, **GREEDY)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.model == MODEL and answer.system_fingerprint == "fp_ollama"
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    if choice.finish_reason == "length":
        assert answer.usage.completion_tokens == GREEDY["max_tokens"]

    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True, **GREEDY))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    *content, finish = chunks
    assert finish.choices[0].delta.content is None and finish.choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content) == choice.message.content
    assert finish.usage is None  # no include_usage: no usage chunk


def test_include_usage_adds_a_final_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    *_, finish, totals = chunks
    assert finish.choices[0].finish_reason in ("stop", "length")
    assert totals.choices == [] and totals.usage is not None
    assert 0 < totals.usage.completion_tokens <= GREEDY["max_tokens"]
    if finish.choices[0].finish_reason == "length":
        assert totals.usage.completion_tokens == GREEDY["max_tokens"]
    assert totals.usage.total_tokens == totals.usage.prompt_tokens + totals.usage.completion_tokens


def test_server_sent_events_are_framed_and_end_with_done(server: BerthServer) -> None:
    body = {"model": MODEL, "messages": QUESTION, "stream": True, **GREEDY}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(event.startswith("data: {") for event in events[:-2])
    assert json.loads(events[-3].removeprefix("data: "))["choices"][0]["delta"] == {}


def test_stop_max_completion_tokens_and_defaults(client: openai.OpenAI) -> None:
    free = client.chat.completions.create(model=MODEL, messages=QUESTION, **GREEDY).choices[0].message.content
    assert free
    stop = free.strip().split()[1] if len(free.split()) > 1 else free[-1]
    stopped = client.chat.completions.create(model=MODEL, messages=QUESTION, stop=stop, **GREEDY).choices[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.message.content
    assert free.startswith(stopped.message.content)
    listed = client.chat.completions.create(model=MODEL, messages=QUESTION, stop=[stop, "zzz"], **GREEDY)
    assert listed.choices[0].message.content == stopped.message.content
    short = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, seed=7,
                                           max_completion_tokens=3)
    assert short.usage is not None and short.usage.completion_tokens <= 3


def test_content_parts_and_tool_history_are_accepted(client: openai.OpenAI) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "What color is"},
                                          {"type": "text", "text": "the sky?"}]}]
    answer = client.chat.completions.create(model=MODEL, messages=parts, **GREEDY)
    assert answer.choices[0].message.content
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "So?"},
    ]
    assert client.chat.completions.create(model=MODEL, messages=history, **GREEDY).choices[0].finish_reason


def test_json_mode_returns_json(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=60)
    text = answer.choices[0].message.content or ""
    assert text.lstrip().startswith("{")
    if answer.choices[0].finish_reason == "stop":
        json.loads(text)


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "How old is the cat? Reply in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}},
        temperature=0, max_tokens=40)
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content or "")["age"], int)


# -- text completions ------------------------------------------------------------------------------


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    prompt = "The three primary colors are"
    # Once first, so both compared answers reuse the cached prompt: a cold prompt is evaluated as
    # one batch and a warm one token by token, which can move greedy decoding by a rounding.
    client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    answer = client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
    assert answer.system_fingerprint == "fp_ollama" and answer.choices[0].text
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.completion_tokens <= GREEDY["max_tokens"]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    *pieces, totals = chunks
    assert "".join(c.choices[0].text for c in pieces) == answer.choices[0].text
    assert pieces[-1].choices[0].finish_reason == answer.choices[0].finish_reason
    assert totals.choices == [] and totals.usage is not None
    assert totals.usage.completion_tokens == answer.usage.completion_tokens


# -- embeddings ------------------------------------------------------------------------------------


def test_embeddings_float_and_base64_agree_and_are_normalised(client: openai.OpenAI, server: BerthServer) -> None:
    texts = ["hello world", "good night"]
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert floats.object == "list" and [d.index for d in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens > 0 and floats.usage.total_tokens == floats.usage.prompt_tokens
    # The client asks for base64 by default and decodes it itself.
    decoded = client.embeddings.create(model=MODEL, input=texts)
    for plain, packed in zip(floats.data, decoded.data):
        assert len(plain.embedding) == 640 and math.isclose(norm(plain.embedding), 1.0, rel_tol=1e-4)
        assert packed.embedding == pytest.approx(plain.embedding, abs=1e-6)
    raw = httpx.post(server.url + "/v1/embeddings", timeout=60,
                     json={"model": MODEL, "input": "hello world", "encoding_format": "base64"}).json()
    data = base64.b64decode(raw["data"][0]["embedding"])
    assert struct.unpack(f"<{len(data) // 4}f", data) == pytest.approx(floats.data[0].embedding, abs=1e-6)
    cut = client.embeddings.create(model=MODEL, input="hello world", dimensions=64, encoding_format="float")
    assert len(cut.data[0].embedding) == 64 and math.isclose(norm(cut.data[0].embedding), 1.0, rel_tol=1e-4)
    empty = client.embeddings.create(model=MODEL, input="", encoding_format="float")
    assert len(empty.data) == 1


# -- models ----------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client: openai.OpenAI, server: BerthServer) -> None:
    listed = client.models.list().data
    entry = next(m for m in listed if m.id == MODEL)
    assert entry.object == "model" and entry.owned_by == "library" and entry.created > 1_600_000_000
    tags = httpx.get(server.url + "/api/tags").json()["models"]
    assert [m.id for m in listed] == [t["name"] for t in tags]
    one = client.models.retrieve(MODEL)
    assert (one.id, one.created, one.owned_by) == (entry.id, entry.created, entry.owned_by)
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("missing:1")
    assert missing.value.status_code == 404 and "not found" in missing.value.message


def test_an_empty_model_list_is_an_empty_array(fresh_server: BerthServer) -> None:
    with ollama.Client(host=fresh_server.url) as native:
        native.delete(MODEL)
    listed = httpx.get(fresh_server.url + "/v1/models").json()
    assert listed == {"object": "list", "data": []}


# -- errors ----------------------------------------------------------------------------------------


def test_missing_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as chat:
        client.chat.completions.create(model="missing:1", messages=QUESTION)
    assert chat.value.body == {"message": "model 'missing:1' not found", "type": "not_found_error",
                               "param": None, "code": None}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing:1", prompt="hi")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="missing:1", input="hi")


@pytest.mark.parametrize(
    "messages,extra,message",
    [
        ([], {}, "[] is too short - 'messages'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
         {}, "image URLs are not currently supported"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lG"}}]}],
         {}, "invalid image input"),
        # A well-formed image reaches the model check: the default model has no vision projector.
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}]}],
         {}, "does not support images"),
        ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                "function": {"name": "f", "arguments": "{oops"}}]}],
         {}, "invalid tool call arguments"),
        (QUESTION, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
         "does not support tools"),
        (QUESTION, {"extra_body": {"stop": [1]}}, "stop"),
    ],
)
def test_bad_chat_requests_are_400(client: openai.OpenAI, messages: list, extra: dict, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=messages, **extra)
    assert error.value.status_code == 400 and message in error.value.message
    assert isinstance(error.value.body, dict) and error.value.body["type"] == "invalid_request_error"


def test_bad_embedding_requests_are_400(client: openai.OpenAI, server: BerthServer) -> None:
    with pytest.raises(openai.BadRequestError, match="invalid input"):
        client.embeddings.create(model=MODEL, input=[])
    response = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": "x", "encoding_format": "hex"})
    assert response.status_code == 400 and "encoding_format" in response.json()["error"]["message"]


def test_native_paths_keep_ollama_errors(server: BerthServer) -> None:
    response = httpx.post(server.url + "/api/chat", json={"model": "missing:1", "messages": QUESTION})
    assert response.status_code == 404 and response.json() == {"error": "model 'missing:1' not found"}


# -- langchain-ollama (native API) -----------------------------------------------------------------


def test_langchain_chat_invoke_and_stream(server: BerthServer) -> None:
    chat = ChatOllama(model=MODEL, base_url=server.url, temperature=0, seed=7, num_predict=12)
    answer = chat.invoke("What color is the sky?")
    assert isinstance(answer.content, str) and answer.content
    assert "".join(str(piece.content) for piece in chat.stream("What color is the sky?")) == answer.content
    with ollama.Client(host=server.url) as native:
        expected = native.chat(model=MODEL, messages=QUESTION, options={"temperature": 0, "seed": 7,
                                                                         "num_predict": 12})
    assert answer.content == expected.message.content


def test_langchain_embeddings(server: BerthServer) -> None:
    embedder = OllamaEmbeddings(model=MODEL, base_url=server.url)
    one = embedder.embed_query("hello world")
    many = embedder.embed_documents(["hello world", "good night"])
    assert len(one) == 640 and math.isclose(norm(one), 1.0, rel_tol=1e-4)
    assert many[0] == pytest.approx(one, abs=1e-6) and many[1] != many[0]


# -- translation, without a server -----------------------------------------------------------------


def test_tool_calls_in_messages_become_native_calls() -> None:
    body = shapes.ChatCompletionRequest.model_validate({"model": MODEL, "messages": [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_b", "content": "noon"},
        {"role": "tool", "name": "weather", "content": "sunny"},
    ]})
    call, result, named = shapes.chat_input(body).messages
    assert [(c.id, c.name, c.arguments, c.index) for c in call.tool_calls] == [
        ("call_a", "weather", {"city": "Paris"}, 0), ("call_b", "time", {}, 1)]
    assert (result.tool_name, result.tool_call_id) == ("time", "call_b")
    assert named.tool_name == "weather"


def test_content_parts_become_messages_of_the_same_role() -> None:
    body = shapes.ChatCompletionRequest.model_validate({"model": MODEL, "messages": [
        {"role": "User", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": "data:image/jpeg;base64,aGk="},
                                     {"type": "image_url", "image_url": {"url": "data:;base64,aGk="}}]}]})
    messages = shapes.chat_input(body).messages
    assert [(m.role, m.content, m.images) for m in messages] == [
        ("user", "look", ()), ("user", "", (b"hi",)), ("user", "", (b"hi",))]
    with pytest.raises(InvalidInput, match="invalid message format"):
        shapes.chat_messages([shapes.MessageIn(role="user", content=[{"type": "input_file"}])])


def test_options_defaults_and_formats() -> None:
    chat = shapes.ChatCompletionRequest.model_validate({"model": MODEL, "messages": QUESTION})
    assert chat.options() == {"temperature": 1.0, "top_p": 1.0}
    assert chat.format() is None
    full = shapes.ChatCompletionRequest.model_validate({
        "model": MODEL, "messages": QUESTION, "temperature": 0.2, "top_p": 0.5, "seed": 3, "stop": "x",
        "max_tokens": 9, "max_completion_tokens": 7, "frequency_penalty": 0.1, "presence_penalty": 0.3,
        "response_format": {"type": "json_object"}})
    assert full.options() == {"temperature": 0.2, "top_p": 0.5, "seed": 3, "stop": ["x"], "num_predict": 7,
                              "frequency_penalty": 0.1, "presence_penalty": 0.3}
    assert full.format() == "json"
    schema = {"type": "object"}
    typed = shapes.ChatCompletionRequest.model_validate({
        "model": MODEL, "messages": QUESTION, "response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "x", "schema": schema}}})
    assert typed.format() == schema
    completion = shapes.CompletionRequest.model_validate({"model": MODEL, "prompt": "hi", "top_p": 0})
    assert completion.options() == {"temperature": 1.0, "top_p": 1.0, "frequency_penalty": 0.0,
                                    "presence_penalty": 0.0}


def test_native_tool_call_chunks_translate_to_openai() -> None:
    native_call = {"id": "call_x", "function": {"index": 0, "name": "weather", "arguments": {"city": "Oslo"}}}
    chunks = [
        {"model": MODEL, "message": {"role": "assistant", "content": "", "tool_calls": [native_call]}, "done": False},
        {"model": MODEL, "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
         "prompt_eval_count": 5, "eval_count": 9},
    ]
    streamed = shapes.ChatTranslator(include_usage=True)
    events = [event for chunk in chunks for event in streamed.events(chunk)] + streamed.closing_events()
    delta = events[0]["choices"][0]["delta"]
    assert delta["role"] == "assistant"
    assert delta["tool_calls"] == [{"id": "call_x", "index": 0, "type": "function",
                                    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]
    assert events[1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "tool_calls"}
    assert events[2]["choices"] == [] and events[2]["usage"] == {"prompt_tokens": 5, "completion_tokens": 9,
                                                                 "total_tokens": 14}
    whole = shapes.ChatTranslator(include_usage=False)
    for chunk in chunks:
        whole.events(chunk)
    answer = whole.response()
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    assert answer["choices"][0]["message"]["tool_calls"] == delta["tool_calls"]
    assert shapes.finish_reason("length", True) == "length"


def test_error_envelope() -> None:
    assert shapes.error_body(503, "busy") == {"error": {"message": "busy", "type": "api_error", "param": None,
                                                        "code": None}}


def test_reasoning_and_content_travel_in_separate_chunks() -> None:
    translator = shapes.ChatTranslator(include_usage=False)
    chunk = {"model": MODEL, "message": {"role": "assistant", "thinking": "hmm", "content": "blue"}, "done": False}
    first, second = translator.events(chunk)
    assert first["choices"][0]["delta"] == {"role": "assistant", "reasoning": "hmm"}
    assert second["choices"][0]["delta"] == {"content": "blue"}
    translator.events({"model": MODEL, "message": {"role": "assistant", "content": ""}, "done": True,
                       "done_reason": "stop", "eval_count": 2})
    assert translator.response()["choices"][0]["message"] == {"role": "assistant", "content": "blue",
                                                              "reasoning": "hmm"}


def test_an_error_after_the_first_event_is_an_error_event() -> None:
    async def chunks() -> AsyncIterator[dict[str, Any]]:
        yield {"model": MODEL, "response": "a", "done": False}
        raise RunnerError("the runner process exited")

    async def run() -> list[bytes]:
        response = await openai_routes._answer(chunks(), shapes.CompletionTranslator(False), stream=True)
        assert isinstance(response, StreamingResponse)
        return [part async for part in response.body_iterator]  # type: ignore[misc]

    events = asyncio.run(run())
    assert json.loads(events[0].removeprefix(b"data: "))["choices"][0]["text"] == "a"
    assert json.loads(events[-1].removeprefix(b"data: ")) == {"error": {
        "message": "the runner process exited", "type": "api_error", "param": None, "code": None}}
