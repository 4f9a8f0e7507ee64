"""`berth create` and `berth import-ollama`, driven as a user would, against live servers."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from berth.registry.default_model import DEFAULT_MODEL_NAME, find_bundled
from berth.registry.digest import Digest
from berth.registry.modelfile import parse
from tests.cli.test_cli import berth
from tests.conftest import BerthServer, berth_executable
from tests.registry.test_gguf import BASE_DATA_SIZE, base_kvs, base_tensors, build, kv_str
from tests.registry.test_ollama_import import fake_ollama_store

PREFIX = "create-cli/"

PIRATE = '''# A model made from the default GGUF
FROM ./model.gguf
TEMPLATE """{{- if .System }}<start_of_turn>user
{{ .System }}<end_of_turn>
{{ end }}
{{- range .Messages }}{{ if ne .Role "system" }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}
{{ .Content }}<end_of_turn>
{{ end }}{{ end }}<start_of_turn>model
"""
SYSTEM Answer with one word.
PARAMETER temperature 0.4
PARAMETER top_k 20
PARAMETER stop <end_of_turn>
PARAMETER stop <eos>
MESSAGE user Hello
MESSAGE assistant Ahoy
LICENSE """Apache-2.0"""
'''
# What PIRATE's template makes of the SYSTEM, the MESSAGE history and one question.
PIRATE_PROMPT = ("<start_of_turn>user\nAnswer with one word.<end_of_turn>\n<start_of_turn>user\nHello<end_of_turn>\n"
                 "<start_of_turn>model\nAhoy<end_of_turn>\n<start_of_turn>user\nWhat color is the sky?<end_of_turn>\n"
                 "<start_of_turn>model\n")


@pytest.fixture(scope="module")
def gguf_copy(server: BerthServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's GGUF as a user would have it: a file of its own, outside the store."""
    bundled = find_bundled()
    assert bundled is not None
    target = tmp_path_factory.mktemp("weights") / "model.gguf"
    shutil.copyfile(server.models_dir / "blobs" / bundled.digest.filename, target)
    return target


@pytest.fixture
def http(server: BerthServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client
        for model in client.get("/api/tags").json()["models"]:
            if model["name"].startswith(PREFIX):
                client.request("DELETE", "/api/delete", json={"model": model["name"]})


def in_folder(folder: Path, *args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([berth_executable(), *args], env=env, cwd=folder, capture_output=True, text=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, f"berth {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_create_from_the_default_gguf_round_trips_and_chats(server: BerthServer, http: httpx.Client,
                                                            gguf_copy: Path, tmp_path: Path) -> None:
    (tmp_path / "model.gguf").hardlink_to(gguf_copy)
    (tmp_path / "Modelfile").write_text(PIRATE)
    name = PREFIX + "pirate:latest"
    out = berth("create", name, "-f", str(tmp_path / "Modelfile"), env=server.env()).stdout.splitlines()
    # A local server links the file rather than receiving a copy of it.
    assert out[:2] == ["linked model.gguf", "parsing GGUF"] and out[-2:] == ["writing manifest", "success"]
    bundled = find_bundled()
    assert bundled is not None and f"using existing layer {bundled.digest}" in out

    shown = berth("show", name, "--modelfile", env=server.env()).stdout
    again, original = parse(shown), parse(PIRATE)
    assert (again.template, again.system, again.parameters, again.messages, again.licenses) == (
        original.template, original.system, original.parameters, original.messages, original.licenses)
    assert again.from_ == (str(server.models_dir / "blobs" / bundled.digest.filename),)
    assert berth("show", name, "--system", env=server.env()).stdout == "Answer with one word.\n"

    # Chat renders the model's template with its SYSTEM and MESSAGE history: the same text as a raw
    # generate of the prompt that template produces, greedy, under the model's own stop words.
    options = {"temperature": 0, "num_predict": 8}
    chat = http.post("/api/chat", json={"model": name, "stream": False, "options": options,
                                        "messages": [{"role": "user", "content": "What color is the sky?"}]})
    assert chat.status_code == 200, chat.text
    raw = http.post("/api/generate", json={"model": name, "prompt": PIRATE_PROMPT, "raw": True, "stream": False,
                                           "options": options})
    assert chat.json()["message"]["content"] == raw.json()["response"] and raw.json()["response"]


def unique_gguf(folder: Path) -> Path:
    path = folder / "tiny.gguf"
    path.write_bytes(build(base_kvs() + [kv_str("general.description", uuid.uuid4().hex)], base_tensors(),
                           BASE_DATA_SIZE))
    return path


def test_upload_sends_only_the_blobs_the_server_lacks(server: BerthServer, http: httpx.Client,
                                                      tmp_path: Path) -> None:
    path = unique_gguf(tmp_path)
    (tmp_path / "Modelfile").write_text("FROM ./tiny.gguf\nSYSTEM uploaded\n")
    first = berth("create", PREFIX + "up", "-f", str(tmp_path / "Modelfile"), "--upload", env=server.env()).stdout
    size = path.stat().st_size
    assert f"uploaded 1 of 1 files ({size} bytes)" in first and first.splitlines()[-1] == "success"
    blob = server.models_dir / "blobs" / Digest.of_bytes(path.read_bytes()).filename
    assert blob.read_bytes() == path.read_bytes() and blob.stat().st_ino != path.stat().st_ino  # a copy
    modified = blob.stat().st_mtime_ns
    second = berth("create", PREFIX + "up2", "-f", str(tmp_path / "Modelfile"), "--upload", env=server.env()).stdout
    assert "uploaded 0 of 1 files (0 bytes)" in second and "using existing blob sha256:" in second
    assert blob.stat().st_mtime_ns == modified
    assert http.post("/api/show", json={"model": PREFIX + "up2"}).json()["system"] == "uploaded"


def test_the_default_modelfile_and_quiet(server: BerthServer, http: httpx.Client, tmp_path: Path) -> None:
    (tmp_path / "Modelfile").write_text(f"FROM {DEFAULT_MODEL_NAME}\nSYSTEM quiet one\n")
    result = in_folder(tmp_path, "create", PREFIX + "quiet", "--quiet", env=server.env())
    assert result.stdout == "" and result.stderr == ""
    assert http.post("/api/show", json={"model": PREFIX + "quiet"}).json()["system"] == "quiet one"


@pytest.mark.parametrize(
    "modelfile,files,message",
    [
        (None, {}, "Error: cannot read the Modelfile Modelfile: No such file or directory; write one or give its "
                   "path with -f"),
        ("FROM x\nFLY away\n", {}, 'Error: Modelfile: (line 2): command must be one of'),
        ("FROM no-such:1\n", {}, 'Error: model "no-such:1" not found; pull it first with `berth pull no-such:1`'),
        ("FROM ./junk.gguf\n", {"junk.gguf": b"just text"}, "Error: supplied file was not in GGUF format"),
        ("FROM ./junk.gguf\n", {"junk.gguf": b"GGUF\x03\x00\x00\x00"}, "Error: invalid GGUF: "),
        ("FROM ./folder\n", {"folder/x": b""}, "Error: Modelfile: ./folder is a folder"),
    ],
)
def test_errors_are_one_clear_line(server: BerthServer, tmp_path: Path, modelfile: str | None,
                                   files: dict[str, bytes], message: str) -> None:
    if modelfile is not None:
        (tmp_path / "Modelfile").write_text(modelfile)
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    for extra in ([], ["--upload"]):
        result = in_folder(tmp_path, "create", PREFIX + "broken", *extra, env=server.env(), check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr


def test_import_ollama_while_a_server_uses_the_store(fresh_server: BerthServer, tmp_path: Path) -> None:
    ollama = tmp_path / "ollama"
    fake_ollama_store(ollama)
    env = {**fresh_server.env(), "OLLAMA_MODELS": str(ollama)}
    result = berth("import-ollama", env=env, check=False)
    assert result.returncode == 1  # some entries were skipped, and said so
    lines = result.stdout.splitlines()
    assert any(line.startswith("imported tiny:latest (") for line in lines)
    assert any(line.startswith("imported example.com:5000/team/tiny:v1 (") for line in lines)
    assert sum(line.startswith("skipped ") for line in lines) == 5
    assert lines[-1] == "2 imported, 0 already present, 5 skipped"
    assert "Error: 5 manifests of" in result.stderr
    listed = {m["name"] for m in httpx.get(fresh_server.url + "/api/tags").json()["models"]}
    assert {"tiny:latest", "example.com:5000/team/tiny:v1", DEFAULT_MODEL_NAME} <= listed
    shown = httpx.post(fresh_server.url + "/api/show", json={"model": "tiny"}).json()
    assert shown["details"]["family"] == "llama" and shown["model_info"]["general.architecture"] == "llama"
    again = berth("import-ollama", str(ollama), env=env, check=False).stdout
    assert "tiny:latest is already in Berth" in again
    missing = berth("import-ollama", str(tmp_path / "nothing"), env=env, check=False)
    assert missing.returncode == 1 and "is not an Ollama models folder" in missing.stderr
