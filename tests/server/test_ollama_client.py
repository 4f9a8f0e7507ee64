"""The official `ollama` Python package against every native endpoint it has: list, show,
generate, chat, embed, copy, delete, ps, create (with blob upload), pull and push (through a real
local registry).

These check that the client's own types parse our answers; behaviour in depth is tested in
test_inference.py and test_api_models.py.
"""

from __future__ import annotations

import math
from typing import Iterator

import ollama
import pytest

from berth.registry.default_model import DEFAULT_MODEL_NAME
from tests.conftest import BerthServer
from tests.registry_fixture import LocalRegistry

MODEL = DEFAULT_MODEL_NAME
GREEDY = {"temperature": 0, "seed": 7, "num_predict": 8}


@pytest.fixture(scope="module")
def client(server: BerthServer) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, timeout=300) as native:
        yield native


def test_list_and_show(client: ollama.Client) -> None:
    entry = next(m for m in client.list().models if m.model == MODEL)
    assert entry.size and entry.digest and entry.modified_at and entry.details
    assert entry.details.format == "gguf" and entry.details.family
    shown = client.show(MODEL)
    assert shown.template and "completion" in (shown.capabilities or [])
    assert shown.modelinfo is not None and shown.modelinfo.get("general.architecture")
    assert shown.modified_at is not None and shown.details.parameter_size
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("missing:1")
    assert missing.value.status_code == 404


def test_generate_and_chat(client: ollama.Client) -> None:
    generated = client.generate(model=MODEL, prompt="Name a color.", options=GREEDY)
    assert generated.done and generated.response and generated.eval_count
    streamed = list(client.generate(model=MODEL, prompt="Name a color.", options=GREEDY, stream=True))
    assert "".join(c.response for c in streamed) == generated.response and streamed[-1].done
    chat = client.chat(model=MODEL, messages=[{"role": "user", "content": "Name a color."}], options=GREEDY)
    assert chat.message.role == "assistant" and chat.message.content and chat.done_reason in ("stop", "length")
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="missing:1", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404


def test_embed_and_ps(client: ollama.Client) -> None:
    embedded = client.embed(model=MODEL, input=["one", "two"])
    assert len(embedded.embeddings) == 2
    assert math.isclose(math.sqrt(sum(x * x for x in embedded.embeddings[0])), 1.0, rel_tol=1e-4)
    running = client.ps().models
    assert any(m.model == MODEL and m.size and m.expires_at for m in running)


def test_copy_and_delete(fresh_server: BerthServer) -> None:
    with ollama.Client(host=fresh_server.url) as native:
        assert native.copy(MODEL, "mine/copy:1").status == "success"
        assert {m.model for m in native.list().models} == {MODEL, "mine/copy:1"}
        assert native.show("mine/copy:1").template == native.show(MODEL).template
        assert native.delete("mine/copy:1").status == "success"
        assert [m.model for m in native.list().models] == [MODEL]
        # The client reports failures of copy and delete as exceptions carrying the status.
        with pytest.raises(ollama.ResponseError) as missing:
            native.delete("mine/copy:1")
        assert missing.value.status_code == 404


def test_create_with_an_uploaded_blob_then_push_and_pull(fresh_server: BerthServer, registry: LocalRegistry,
                                                          tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    weights = next(p for p in (fresh_server.models_dir / "blobs").iterdir() if p.stat().st_size > 100_000_000)
    local = Path(tmp_path) / "model.gguf"
    local.write_bytes(weights.read_bytes())
    with ollama.Client(host=fresh_server.url, timeout=300) as native:
        digest = native.create_blob(local)
        assert digest == "sha256:" + weights.name[7:]
        progress = list(native.create(model="uploaded:1", files={"model.gguf": digest}, system="Be brief.",
                                      parameters={"temperature": 0.1}, stream=True))
        assert progress[-1].status == "success"
        shown = native.show("uploaded:1")
        assert "SYSTEM Be brief." in (shown.modelfile or "") and shown.details.family == "gemma3"
        derived = native.create(model="derived:1", from_="uploaded:1", template="{{ .Prompt }}")
        assert derived.status == "success"

        target = f"{registry.host}/team/uploaded:1"
        assert native.copy("uploaded:1", target).status == "success"
        pushed = list(native.push(target, insecure=True, stream=True))
        assert pushed[-1].status == "success"
        assert any(p.digest and p.total for p in pushed)
        native.delete(target)
        native.delete("uploaded:1")
        pulled = list(native.pull(target, insecure=True, stream=True))
        assert pulled[-1].status == "success"
        assert "SYSTEM Be brief." in (native.show(target).modelfile or "")
