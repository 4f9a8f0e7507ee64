"""Blob upload and create against a live server holding the real default model."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import ollama
import pytest

from berth.registry.create import MAX_BLOB_BYTES
from berth.registry.default_model import DEFAULT_MODEL_NAME, find_bundled
from berth.registry.digest import Digest
from berth.registry.gguf import NOT_GGUF_MESSAGE
from tests.conftest import BerthServer
from tests.registry.test_gguf import BASE_DATA_SIZE, base_kvs, base_tensors, build, kv_str

MODEL = DEFAULT_MODEL_NAME
PREFIX = "create-test/"  # every model these tests make; removed after each test


def unique_gguf() -> bytes:
    """A small valid llama GGUF that no other test uploads (a random description)."""
    return build(base_kvs() + [kv_str("general.description", uuid.uuid4().hex)], base_tensors(), BASE_DATA_SIZE)


@pytest.fixture
def client(server: BerthServer) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, timeout=300) as native:
        yield native
        for model in native.list().models:
            if model.model and model.model.startswith(PREFIX):
                native.delete(model.model)


def blob_file(server: BerthServer, digest: Digest | str) -> Path:
    return server.models_dir / "blobs" / (digest if isinstance(digest, Digest) else Digest.parse(digest)).filename


def raw_request(server: BerthServer, head: str, body_start: bytes = b"") -> tuple[int, str]:
    """Send a request head and the first bytes of a body, and read the answer without sending more."""
    host, port = server.host.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + body_start)
        answer = b""
        while not _complete(answer):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return int(answer.split(b" ", 2)[1]), answer.decode(errors="replace")


def _complete(answer: bytes) -> bool:
    head, separator, body = answer.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


def blob_post_head(server: BerthServer, digest: str, length: int) -> str:
    return (f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: {server.host}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n")


# -- blobs ---------------------------------------------------------------------------------------


def test_head_blob_answers_400_404_200(http: httpx.Client) -> None:
    bundled = find_bundled()
    assert bundled is not None
    assert http.head(f"/api/blobs/{bundled.digest}").status_code == 200
    assert http.head(f"/api/blobs/sha256:{'0' * 64}").status_code == 404
    for bad in ("sha256:xyz", f"sha256-{'0' * 64}", f"sha256:{'A' * 64}", "../../etc/passwd"):
        assert http.head(f"/api/blobs/{bad}").status_code in (400, 404), bad
    response = http.post(f"/api/blobs/sha256-{'0' * 64}", content=b"x")
    assert response.status_code == 400 and response.json()["error"].startswith("invalid digest format")


def test_upload_streams_to_the_store_then_answers_200(http: httpx.Client, server: BerthServer) -> None:
    data = unique_gguf() * 50  # several chunks
    digest = str(Digest.of_bytes(data))
    chunks = (data[i:i + 7000] for i in range(0, len(data), 7000))  # chunked encoding, no length
    response = http.post(f"/api/blobs/{digest}", content=chunks)
    assert response.status_code == 201, response.text
    assert blob_file(server, digest).read_bytes() == data
    assert http.head(f"/api/blobs/{digest}").status_code == 200
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 200


def test_a_wrong_digest_is_400_and_nothing_is_kept(http: httpx.Client, server: BerthServer) -> None:
    data = unique_gguf()
    claimed = f"sha256:{'0' * 64}"
    response = http.post(f"/api/blobs/{claimed}", content=data)
    assert response.status_code == 400
    assert response.json() == {"error": f'digest mismatch, expected "{claimed}", got "{Digest.of_bytes(data)}"'}
    # Stricter than Ollama, which keeps the bytes under their true digest.
    assert not blob_file(server, claimed).exists() and not blob_file(server, Digest.of_bytes(data)).exists()
    assert not [p for p in (server.models_dir / "blobs").iterdir() if p.name.startswith(".incoming-")]


def test_an_existing_blob_answers_before_its_body_is_sent(server: BerthServer) -> None:
    bundled = find_bundled()
    assert bundled is not None
    status, _ = raw_request(server, blob_post_head(server, str(bundled.digest), 10**9), b"GGUF")
    assert status == 200  # answered with almost all of the gigabyte unsent


def test_a_body_declared_over_the_bound_is_refused_at_once(server: BerthServer) -> None:
    status, answer = raw_request(server, blob_post_head(server, f"sha256:{'1' * 64}", MAX_BLOB_BYTES + 1))
    assert status == 400 and "limit" in answer


def test_a_local_client_hands_files_over_its_socket(http: httpx.Client, server: BerthServer,
                                                   tmp_path: Path) -> None:
    """No path goes over HTTP: the client opens the file and passes the descriptor, and the server
    links that very inode into its store."""
    from berth.registry.file_handoff import hand_over

    path = tmp_path / "model.gguf"
    path.write_bytes(unique_gguf())
    socket_name = http.get("/api/handoff").json()["socket"]
    received = hand_over(socket_name, [str(path)])
    assert received[0].digest == str(Digest.of_bytes(path.read_bytes()))
    assert http.head(f"/api/blobs/{received[0].digest}").status_code == 200
    if received[0].method == "hardlink":
        assert blob_file(server, received[0].digest).stat().st_ino == path.stat().st_ino  # linked, not copied
    body = {"model": PREFIX + "handed", "files": {"model.gguf": received[0].digest}, "stream": False}
    assert http.post("/api/create", json=body).json() == {"status": "success"}


def sha_zero() -> str:
    return f"sha256:{'0' * 64}"


# -- create with the official client ---------------------------------------------------------


def test_official_client_creates_from_a_model(client: ollama.Client, http: httpx.Client) -> None:
    name = PREFIX + "pirate:latest"
    template = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}"
    result = client.create(model=name, from_=MODEL, system="You are a pirate.", template=template,
                           parameters={"temperature": 0.5, "stop": ["<end_of_turn>", "Arr"]},
                           messages=[{"role": "user", "content": "Ahoy"}, {"role": "assistant", "content": "Arr"}])
    assert result.status == "success"
    shown = client.show(name)
    assert shown.template == template
    raw = http.post("/api/show", json={"model": name}).json()  # the client's ShowResponse drops messages
    assert raw["messages"] == [{"role": "user", "content": "Ahoy"}, {"role": "assistant", "content": "Arr"}]
    assert raw["system"] == "You are a pirate."
    assert shown.parameters is not None
    lines = shown.parameters.splitlines()
    assert 'temperature                    0.5' in lines and 'stop                           "Arr"' in lines
    assert any(line.startswith("top_k") for line in lines)  # inherited from gemma3:270m
    assert shown.details is not None and shown.details.family == "gemma3"
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "gemma3"
    assert "SYSTEM You are a pirate." in (shown.modelfile or "")
    assert name in {m.model for m in client.list().models}


def test_official_client_uploads_a_blob_then_creates_from_it(client: ollama.Client, server: BerthServer,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(unique_gguf())
    digest = client.create_blob(path)
    assert digest == str(Digest.of_bytes(path.read_bytes()))
    assert blob_file(server, digest).read_bytes() == path.read_bytes()
    statuses = [p.status for p in client.create(model=PREFIX + "tiny", files={"tiny.gguf": digest},
                                                system="hi", stream=True)]
    assert statuses[0] == "parsing GGUF" and f"using existing layer {digest}" in statuses
    assert statuses[-2:] == ["writing manifest", "success"]
    shown = client.show(PREFIX + "tiny")
    assert shown.details is not None
    assert (shown.details.family, shown.details.parameter_size, shown.details.quantization_level) == (
        "llama", "5K", "F16")
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 4096


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"model": PREFIX + "x"}, 400, "neither 'from' or 'files' was specified"),
        ({"from": MODEL}, 400, "model is required"),
        ({"model": "bad/../name", "from": MODEL}, 400, "invalid model name"),
        ({"model": PREFIX + "x", "from": "no-such-model"}, 404,
         'model "no-such-model" not found; pull it first with `berth pull no-such-model`'),
        ({"model": PREFIX + "x", "from": MODEL, "quantize": "q4_K_M"}, 400, "quantization is not supported yet"),
        ({"model": PREFIX + "x", "from": MODEL, "template": "{{ .Prompt"}, 400, "template error: "),
        ({"model": PREFIX + "x", "files": {"m.gguf": f"sha256:{'2' * 64}"}}, 400, "upload it first"),
        ({"model": PREFIX + "x", "files": {"/etc/m.gguf": f"sha256:{'2' * 64}"}}, 400, "file path must be relative"),
    ],
)
@pytest.mark.parametrize("stream", [True, False])
def test_create_errors_have_their_status(http: httpx.Client, body: dict, status: int, message: str,
                                         stream: bool) -> None:
    response = http.post("/api/create", json={**body, "stream": stream})
    assert response.status_code == status and message in response.json()["error"]


@pytest.mark.parametrize(
    "data,message",
    [(b"this is not a model, just some text", NOT_GGUF_MESSAGE), (unique_gguf()[:-1000], "invalid GGUF: ")],
)
def test_invalid_or_truncated_gguf_is_refused_and_no_model_appears(client: ollama.Client, http: httpx.Client,
                                                                  data: bytes, message: str) -> None:
    digest = str(Digest.of_bytes(data))
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
    with pytest.raises(ollama.ResponseError) as caught:
        client.create(model=PREFIX + "bad", files={"m.gguf": digest})
    assert caught.value.status_code == 400 and message in caught.value.error
    streamed = [line for line in http.post("/api/create", json={"model": PREFIX + "bad", "files": {"m.gguf": digest}})
                .text.splitlines()]
    assert streamed[0] == '{"status":"parsing GGUF"}' and message in streamed[-1] and '"error"' in streamed[-1]
    assert http.post("/api/show", json={"model": PREFIX + "bad"}).status_code == 404


def test_the_early_2024_shape_with_blob_references(client: ollama.Client, http: httpx.Client,
                                                   tmp_path: Path) -> None:
    data = unique_gguf()
    digest = str(Digest.of_bytes(data))
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
    modelfile = f"FROM @{digest}\nSYSTEM old style\nPARAMETER temperature 0.2\n"
    response = http.post("/api/create", json={"name": PREFIX + "old", "modelfile": modelfile, "stream": False})
    assert response.status_code == 200 and response.json() == {"status": "success"}
    shown = client.show(PREFIX + "old")
    assert shown.details is not None and shown.details.family == "llama"
    assert "temperature" in (shown.parameters or "")
    # FROM an existing model, in the same shape (the old Python client sent exactly this).
    response = http.post("/api/create", json={"name": PREFIX + "old2", "modelfile": f"FROM {MODEL}\nSYSTEM two"})
    assert response.status_code == 200 and response.text.splitlines()[-1] == '{"status":"success"}'
    bad = http.post("/api/create", json={"name": PREFIX + "x", "modelfile": "FROM x\nFLY away\n"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("(line 2): command must be one of")


def test_replacing_a_model_deletes_the_layers_only_it_used(client: ollama.Client, server: BerthServer) -> None:
    name = PREFIX + "gc"
    client.create(model=name, from_=MODEL, system="first system prompt " + uuid.uuid4().hex)
    first = [layer for layer in _layers(server, name) if layer[0].endswith("system")][0][1]
    assert blob_file(server, first).exists()
    client.create(model=name, from_=name, system="second system prompt")
    assert not blob_file(server, first).exists()
    weights = find_bundled()
    assert weights is not None and blob_file(server, weights.digest).exists()


def _layers(server: BerthServer, name: str) -> list[tuple[str, str]]:
    import sqlite3

    with sqlite3.connect(server.models_dir / "catalog.db") as conn:
        rows = conn.execute(
            "SELECT l.media_type, l.blob_digest FROM layers l JOIN tags t ON t.manifest_digest = l.manifest_digest "
            "WHERE t.name_key = ? ORDER BY l.position", (f"registry.ollama.ai/{name}:latest".lower(),)).fetchall()
    return [(media, digest) for media, digest in rows]


def test_blob_files_are_readable_by_the_server_after_upload(server: BerthServer, http: httpx.Client) -> None:
    data = unique_gguf()
    digest = Digest.of_bytes(data)
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
    assert oct(os.stat(blob_file(server, digest)).st_mode & 0o777) == "0o644"


def test_a_model_changed_under_the_same_name_is_what_the_next_request_runs(
        client: ollama.Client, http: httpx.Client, server: BerthServer) -> None:
    """The server keeps what a name resolved to until the catalog changes, whoever changes it."""
    name = PREFIX + "changing:latest"

    def rendered() -> httpx.Response:
        return http.post("/api/generate", json={"model": name, "prompt": "Hello", "stream": False,
                                                "_debug_render_only": True})

    client.create(model=name, from_=MODEL, system="First system.")
    assert "First system." in rendered().json()["_debug_info"]["rendered_template"]
    client.create(model=name, from_=MODEL, system="Second system.")
    prompt = rendered().json()["_debug_info"]["rendered_template"]
    assert "Second system." in prompt and "First system." not in prompt
    # Another process on the same store (here: this test's) deletes it.
    from berth.registry.library import Library
    from berth.registry.names import ModelName
    library = Library(server.models_dir)
    try:
        library.delete(ModelName.parse(name))
    finally:
        library.close()
    gone = rendered()
    assert gone.status_code == 404 and "not found" in gone.json()["error"]
