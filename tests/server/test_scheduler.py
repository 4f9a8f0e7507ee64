"""Scheduling against a live server: reloads, eviction, keep-alive, and tools end to end."""

from __future__ import annotations

import time
from datetime import datetime

import httpx
import ollama
import pytest

from registry.default_model import DEFAULT_MODEL_NAME
from tests.conftest import BerthServer, add_variant, start_server

MODEL = DEFAULT_MODEL_NAME


def loaded(http: httpx.Client) -> dict[str, dict]:
    return {m["name"]: m for m in http.get("/api/ps").json()["models"]}


def wait_for(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def one_slot_server(tmp_path) -> BerthServer:  # type: ignore[no-untyped-def]
    srv = start_server(tmp_path / "models", tmp_path / "server.log", {"BERTH_MAX_LOADED_MODELS": "1"})
    yield srv
    srv.stop()


def test_changing_a_load_time_option_reloads_the_runner(fresh_server: BerthServer) -> None:
    with httpx.Client(base_url=fresh_server.url, timeout=120) as http:
        http.post("/api/generate", json={"model": MODEL, "options": {"num_ctx": 2048}})
        assert loaded(http)[MODEL]["context_length"] == 2048
        http.post("/api/generate", json={"model": MODEL, "options": {"num_ctx": 1024}})
        running = loaded(http)
        assert list(running) == [MODEL] and running[MODEL]["context_length"] == 1024
        # A sampling option is not a load-time option: the runner stays.
        http.post("/api/generate", json={"model": MODEL, "prompt": "hi",
                                         "options": {"num_ctx": 1024, "temperature": 0.1, "num_predict": 1}})
        assert loaded(http)[MODEL]["context_length"] == 1024


def test_with_one_slot_the_idle_model_is_evicted(one_slot_server: BerthServer) -> None:
    add_variant(one_slot_server.models_dir, "other:1", system="You are terse.")
    with httpx.Client(base_url=one_slot_server.url, timeout=120) as http:
        http.post("/api/generate", json={"model": MODEL})
        assert list(loaded(http)) == [MODEL]
        http.post("/api/generate", json={"model": "other:1"})
        assert list(loaded(http)) == ["other:1"]


def test_keep_alive_expiry_and_forever(fresh_server: BerthServer) -> None:
    with httpx.Client(base_url=fresh_server.url, timeout=120) as http:
        http.post("/api/generate", json={"model": MODEL, "keep_alive": -1})
        until = datetime.fromisoformat(loaded(http)[MODEL]["expires_at"])
        assert until.year > datetime.now().year + 100
        http.post("/api/generate", json={"model": MODEL, "keep_alive": "1s"})
        assert wait_for(lambda: MODEL not in loaded(http))


TOOL_TEMPLATE = """{{- range .Messages }}<start_of_turn>{{ .Role }}
{{ .Content }}{{ if .ToolCalls }}{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}{{ end }}{{ end }}<end_of_turn>
{{ end }}{{ if .Tools }}Tools: {{ json .Tools }}
{{ end }}<start_of_turn>model
"""

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

CALL_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "enum": ["get_weather"]},
    "arguments": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                  "required": ["city"]}},
    "required": ["name", "arguments"]}


def test_tool_calls_are_parsed_from_the_output(server: BerthServer) -> None:
    add_variant(server.models_dir, "tooly:1", template=TOOL_TEMPLATE)
    client = ollama.Client(host=server.url, timeout=120)
    assert "tools" in client.show("tooly:1").capabilities
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    # The schema makes the tiny model's output a well-formed call, so the parse is what is tested.
    answer = client.chat(model="tooly:1", messages=messages, tools=[WEATHER_TOOL], format=CALL_SCHEMA,
                         options={"temperature": 0, "num_predict": 60})
    calls = answer.message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments["city"] in ("Paris", "Rome")
    streamed = list(client.chat(model="tooly:1", messages=messages, tools=[WEATHER_TOOL], format=CALL_SCHEMA,
                                options={"temperature": 0, "num_predict": 60}, stream=True))
    streamed_calls = [c for chunk in streamed for c in (chunk.message.tool_calls or [])]
    assert [c.function.arguments for c in streamed_calls] == [c.function.arguments for c in calls]
    # The call goes back into the conversation with its result.
    follow = messages + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    again = client.chat(model="tooly:1", messages=follow, options={"temperature": 0, "num_predict": 4})
    assert again.done
