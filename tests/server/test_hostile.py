"""Requests an attacker would send, against a live server on the default model: none may crash a
runner, reveal the server's files, or slip past the types Ollama's API enforces."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import openai
import pytest

from berth.registry.create import PATHS_REFUSED
from berth.registry.default_model import DEFAULT_MODEL_NAME
from berth.registry.digest import Digest
from berth.server import crash_guard
from tests.conftest import BerthServer
from tests.server.test_inference import kill_runner_while_streaming, runner_pids

MODEL = DEFAULT_MODEL_NAME
SHORT = {"temperature": 0, "num_predict": 3}


def runner_died(server: BerthServer) -> bool:
    log = server.log()
    return "killed by signal" in log or "exited unexpectedly" in log


def test_context_ids_outside_the_vocabulary_never_reach_the_runner(server: BerthServer, http: httpx.Client) -> None:
    first = http.post("/api/generate", json={"model": MODEL, "prompt": "Hello", "stream": False, "options": SHORT})
    context = first.json()["context"]
    pids = runner_pids(server)
    for bad in ([10**9], [-1], context + [262_144], [3, 2**40]):
        answer = http.post("/api/generate", json={"model": MODEL, "prompt": "again", "context": bad,
                                                   "stream": False, "options": SHORT})
        assert answer.status_code == 400, answer.text
        assert "vocabulary" in answer.json()["error"] and '"context"' in answer.json()["error"]
    follow = http.post("/api/generate", json={"model": MODEL, "prompt": "again", "context": context,
                                               "stream": False, "options": SHORT})
    assert follow.status_code == 200 and follow.json()["done"]
    assert runner_pids(server) == pids and not runner_died(server)


def test_deeply_nested_json_is_a_400(http: httpx.Client) -> None:
    for levels in (100, 100_000):
        body = '{"model": "%s", "prompt": "hi", "options": %s1%s}' % (MODEL, '{"a":' * levels, "}" * levels)
        answer = http.post("/api/generate", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400, answer.text[:200]
        assert "levels deep" in answer.json()["error"]


def test_nan_and_infinity_are_not_json(http: httpx.Client) -> None:
    body = '{"model": "%s", "prompt": "hi", "options": {"temperature": NaN}}' % MODEL
    answer = http.post("/api/generate", content=body)
    assert answer.status_code == 400 and "not a JSON value" in answer.json()["error"]


@pytest.mark.parametrize("path,body,field", [
    ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": "false"}, "stream"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": 1}, "stream"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "raw": "true"}, "raw"),
    ("/api/generate", {"model": MODEL, "prompt": 7}, "prompt"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "context": [1.5]}, "context.0"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "top_logprobs": 2.0}, "top_logprobs"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/api/chat", {"model": MODEL, "messages": "hi"}, "messages"),
    ("/api/chat", {"model": MODEL, "messages": [{"content": "hi"}]}, "messages.0.role"),
    ("/api/embed", {"model": MODEL, "input": "x", "truncate": "yes"}, "truncate"),
    ("/api/embed", {"model": MODEL, "input": "x", "dimensions": "64"}, "dimensions"),
    ("/api/show", {"model": 5}, "model"),
    ("/api/copy", {"source": MODEL, "destination": ["x"]}, "destination"),
    ("/api/pull", {"model": "x", "insecure": "true"}, "insecure"),
    ("/api/create", {"model": "x:1", "from": MODEL, "system": 7}, "system"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"num_ctx": -5}}, "num_ctx"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"num_batch": 0}}, "num_batch"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"top_k": -3}}, "top_k"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"num_thread": 10**6}}, "num_thread"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"num_predict": -9}}, "num_predict"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"num_keep": -2}}, "num_keep"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"top_p": 1e30}}, "top_p"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"stop": ["x"] * 100}}, "stop"),
])
def test_wrong_types_and_ranges_are_400s_naming_the_field(http: httpx.Client, path: str, body: dict,
                                                           field: str) -> None:
    answer = http.post(path, json=body)
    assert answer.status_code == 400, answer.text
    assert f'"{field}"' in answer.json()["error"], answer.json()["error"]


def test_openai_names_the_wrong_parameter(server: BerthServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"stream": "yes"})
    assert error.value.body["param"] == "stream" and "expected a boolean" in error.value.body["message"]


def test_server_paths_get_one_answer_whatever_is_there(http: httpx.Client, tmp_path: Path) -> None:
    """Whether a path exists, is a folder, a device, unreadable or a GGUF, the answer is the same,
    and it never quotes a file (CVE-2024-39719, CVE-2024-39722)."""
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF" + os.urandom(64))
    digest = Digest.of_bytes(weights.read_bytes())
    answers: set[str] = set()
    for path in ("/etc/shadow", "/etc/passwd", str(weights), str(tmp_path), "/dev/zero", "/nowhere/m.gguf",
                 "./model.gguf", "~/model.gguf"):
        for body in ({"files": {"m.gguf": path}}, {"from": MODEL, "adapters": {"a.gguf": path}},
                     {"path": path}, {"modelfile": f"FROM {path}\n"}, {"modelfile": f"FROM {MODEL}\nADAPTER {path}\n"}):
            answer = http.post("/api/create", json={"model": "paths:1", "stream": False, **body})
            assert answer.status_code == 400, (body, answer.text)
            answers.add(answer.json()["error"])
        blob = http.post(f"/api/blobs/{digest}", params={"path": path})
        assert blob.status_code == 400
        answers.add(blob.json()["error"])
    assert answers == {PATHS_REFUSED}
    assert http.head(f"/api/blobs/{digest}").status_code == 404  # nothing was taken from the path


def test_an_old_client_sending_its_modelfile_path_beside_the_text_is_served(http: httpx.Client) -> None:
    body = {"model": "old-shape:1", "path": "/etc/shadow", "modelfile": f"FROM {MODEL}\nSYSTEM kept\n", "stream": False}
    assert http.post("/api/create", json=body).json()["status"] == "success"
    assert http.post("/api/show", json={"model": "old-shape:1"}).json()["system"] == "kept"
    http.request("DELETE", "/api/delete", json={"model": "old-shape:1"})


def test_a_request_that_keeps_killing_its_runner_is_refused(fresh_server: BerthServer) -> None:
    """The runner is killed (SIGKILL, standing in for a crash no check foresaw) each time the same
    request runs; after REQUEST_LIMIT deaths that request is refused, and others are still served."""
    url = fresh_server.url + "/api/generate"
    killer = {"model": MODEL, "prompt": "Count from one to one thousand:", "options": {"num_predict": 2000}}
    for _ in range(crash_guard.REQUEST_LIMIT):
        lines = kill_runner_while_streaming(fresh_server, killer, 2)
        assert "killed by signal 9" in lines[-1]["error"]
    refused = httpx.post(url, json={**killer, "stream": False}, timeout=120)
    assert refused.status_code == 429 and "refused for now" in refused.json()["error"]
    assert "refused request" in fresh_server.log()
    other = httpx.post(url, json={"model": MODEL, "prompt": "hi", "stream": False, "options": SHORT}, timeout=120)
    assert other.status_code == 200 and other.json()["done"]


def test_a_batch_larger_than_the_context_is_cut_to_it(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {**SHORT, "num_ctx": 64, "num_batch": 1 << 22}}
    answer = http.post("/api/generate", json=body)
    assert answer.status_code == 200 and answer.json()["done"]


@pytest.mark.parametrize("body,status,message", [
    ({"keep_alive": "9999999999999999999s"}, 400, "longer than a duration can be"),
    ({"keep_alive": 2**63}, 400, "longer than a duration can be"),
    ({"keep_alive": 1e308}, 400, "longer than a duration can be"),
    ({"format": {"type": "array", "minItems": 100_000}}, 400, '"minItems" is 100000'),
    ({"format": {"type": "string", "maxLength": 10**9}}, 400, '"maxLength" is 1000000000'),
    ({"prompt": "\ud800 lone \udc80 halves"}, 200, ""),
    ({"system": "\udfff"}, 200, ""),
])
def test_values_that_broke_the_server_under_fuzzing(server: BerthServer, http: httpx.Client, body: dict,
                                                      status: int, message: str) -> None:
    payload = {"model": MODEL, "prompt": "hi", "stream": False, "options": SHORT, **body}
    answer = http.post("/api/generate", content=json.dumps(payload), headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert message in answer.json().get("error", "")
    assert http.get("/api/ps").status_code == 200 and not runner_died(server)


def test_embedding_a_lone_surrogate(http: httpx.Client) -> None:
    answer = http.post("/api/embed", content=json.dumps({"model": MODEL, "input": "\ud800"}))
    assert answer.status_code == 200 and len(answer.json()["embeddings"]) == 1
