"""Scheduling against a live server: reloads, eviction, keep-alive, and tools end to end."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import httpx
import ollama
import pytest

from berth.registry.default_model import DEFAULT_MODEL_NAME
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


def test_a_load_waiting_for_room_gets_it_when_the_busy_model_leaves(one_slot_server: BerthServer) -> None:
    """One model at a time: B waits for A's room while A answers a request with keep_alive 0. A then
    leaves by itself (it is never seen idle), and B must still be loaded: the wait used to look only
    for an idle model, found none, and held the load lock for ever."""
    import threading

    add_variant(one_slot_server.models_dir, "other:1", system="You are terse.")
    with httpx.Client(base_url=one_slot_server.url, timeout=120) as http:
        answers: list[httpx.Response] = []
        first = threading.Thread(target=lambda: answers.append(http.post("/api/generate", json={
            "model": MODEL, "prompt": "1, 2, 3,", "raw": True, "keep_alive": 0, "stream": False,
            "options": {"num_predict": 48, "temperature": 0}})))
        first.start()
        assert wait_for(lambda: MODEL in loaded(http))  # A is loaded and answering
        second = http.post("/api/generate", json={"model": "other:1", "prompt": "hi", "options": {"num_predict": 2}},
                           timeout=90)
        first.join(120)
        assert answers and answers[0].status_code == 200
        assert second.status_code == 200, second.text
        assert list(loaded(http)) == ["other:1"]


def test_a_client_that_leaves_a_non_streaming_answer_frees_its_slot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """stream: false is collected inside the server; a client that times out and goes away must
    stop its generation, or the one slot stays busy until num_predict (~100000 tokens here) is
    reached and every later request waits behind it. Probes that give up leave the queue too."""
    srv = start_server(tmp_path / "models", tmp_path / "server.log", {"BERTH_NUM_PARALLEL": "1"})
    short = {"model": MODEL, "prompt": "hi", "options": {"num_predict": 1}}
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            assert http.post("/api/generate", json=short).status_code == 200  # loaded
            with pytest.raises(httpx.ReadTimeout):
                http.post("/api/generate", timeout=3, json={
                    "model": MODEL, "prompt": "1, 2, 3,", "raw": True, "stream": False,
                    # Greedy counting: no end-of-text within the client's 3 s (600 tokens take ~8 s).
                    "options": {"num_predict": 100_000, "temperature": 0}})

            def answered() -> bool:
                try:
                    return http.post("/api/generate", json=short, timeout=5).status_code == 200
                except httpx.ReadTimeout:
                    return False  # still behind the abandoned generation

            assert wait_for(answered, timeout=60)
    finally:
        srv.stop()


class FakeRunner:
    """FAKE runner process (no model): what is tested is the scheduler's interleaving, which a
    real runner behind HTTP cannot be made to hit at an exact point."""

    def __init__(self, spec: object, label: str) -> None:
        self.alive, self.stopped, self.pid = True, False, 1
        self.info = {"slots": 1}

    def start(self, timeout: float) -> None:
        pass

    def stop(self, timeout: float = 5.0) -> None:
        self.alive, self.stopped = False, True


def test_a_request_that_attaches_before_a_scheduled_unload_keeps_its_runner(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """keep_alive 0: the last request's release schedules an unload. A request that attaches to
    the runner before that runs must keep it, not see it stopped under it."""
    import asyncio

    import berth.server.scheduler as scheduling
    from berth.registry.digest import Digest
    from berth.registry.names import ModelName
    from berth.server.runner.protocol import LoadSpec

    monkeypatch.setattr(scheduling, "RunnerProcess", FakeRunner)
    ref = scheduling.ModelRef(name=ModelName.parse("m:1"), digest=Digest.of_bytes(b"m"),
                              spec=LoadSpec(model_path="/nowhere"), details={}, size=1)

    async def scenario() -> tuple[bool, bool]:
        scheduler = scheduling.Scheduler(max_loaded=1, num_parallel=1, max_queue=4, default_keep_alive=300,
                                         load_timeout=10)
        first = await scheduler.acquire(ref, keep_alive=0)
        runner = first.runner
        first.release()  # the unload is scheduled, not run yet
        second = await scheduler.acquire(ref, keep_alive=None)  # attaches at once, before it runs
        await asyncio.sleep(0.05)
        kept = not runner.stopped and scheduler.is_loaded(ref.digest) and second.runner is runner
        second.release()
        await asyncio.sleep(0.05)
        return kept, runner.stopped  # and once that request is done, keep_alive 0 unloads it

    assert asyncio.run(scenario()) == (True, True)


def test_a_queue_of_none_serves_a_load_and_turns_away_a_request_that_would_wait_for_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """BERTH_MAX_QUEUE=0: the request that loads a model waits behind nobody, so it is served;
    one that arrives during that load would wait behind it, so it gets QueueFull at once."""
    import asyncio

    import berth.server.scheduler as scheduling
    from berth.registry.digest import Digest
    from berth.registry.names import ModelName
    from berth.server.runner.protocol import LoadSpec

    loading = threading.Event()

    class SlowRunner(FakeRunner):
        def start(self, timeout: float) -> None:
            assert loading.wait(10), "the test never let the load finish"

    monkeypatch.setattr(scheduling, "RunnerProcess", SlowRunner)
    first_ref, second_ref = (scheduling.ModelRef(name=ModelName.parse(f"m:{i}"), digest=Digest.of_bytes(b"m%d" % i),
                                                 spec=LoadSpec(model_path="/nowhere"), details={}, size=1)
                             for i in (1, 2))

    async def scenario() -> bool:
        scheduler = scheduling.Scheduler(max_loaded=2, num_parallel=1, max_queue=0, default_keep_alive=300,
                                         load_timeout=10)
        first = asyncio.create_task(scheduler.acquire(first_ref, keep_alive=None))
        await asyncio.sleep(0.05)  # its load is under way
        with pytest.raises(scheduling.QueueFull):
            await scheduler.acquire(second_ref, keep_alive=None)
        loading.set()
        lease = await first
        served = scheduler.is_loaded(first_ref.digest)
        lease.release()
        return served

    assert asyncio.run(scenario())
