"""Continuous batching (on by default; BERTH_NUM_PARALLEL sets the slots) through a live server:
concurrent streams share a runner."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from registry.default_model import DEFAULT_MODEL_NAME
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
