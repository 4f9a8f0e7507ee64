"""The create service without HTTP: plans from both request shapes, layer assembly, statuses,
refusals for remote clients, and what a failed or interrupted create leaves behind (nothing)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from registry.adopt import FileIdentity, UnreadableFile
from registry.blobstore import TEMP_PREFIX
from registry.builder import ModelBuilder
from registry.create import (
    REMOTE_PATH_REFUSED,
    CreatePlan,
    FileSource,
    MissingBlob,
    ModelCreator,
    plan_from_modelfile,
    plan_from_request,
)
from registry.digest import Digest
from registry.errors import InvalidDigest, InvalidInput, ModelNotFound
from registry.gguf import NOT_GGUF_MESSAGE, InvalidGGUF
from registry.library import Library
from registry.manifest import (
    ADAPTER_LAYER,
    LICENSE_LAYER,
    MESSAGES_LAYER,
    MODEL_LAYER,
    PARAMS_LAYER,
    SYSTEM_LAYER,
    TEMPLATE_LAYER,
    ModelConfig,
)
from registry.modelfile import Message
from registry.names import ModelName
from registry.options import OptionValues
from tests.registry.test_gguf import F16, build, kv_str, tensor, valid_file_bytes


def lora_bytes(architecture: str) -> bytes:
    kvs = [kv_str("general.architecture", architecture), kv_str("general.type", "adapter")]
    return build(kvs, [tensor("blk.0.attn_q.weight.lora_a", [64, 8], F16, 0)], 64 * 8 * 2)


@pytest.fixture
def tiny(library: Library) -> Digest:
    """A small, valid llama GGUF, uploaded as a blob."""
    return library.blobs.write_bytes(valid_file_bytes()).digest


def run(library: Library, name: str, plan: CreatePlan, remote: bool = False) -> list[dict[str, Any]]:
    return list(ModelCreator(library).create(ModelName.parse(name), plan, remote=remote))


def temp_files(library: Library) -> list[str]:
    return [name for name in os.listdir(library.blobs.blobs_dir) if name.startswith(TEMP_PREFIX)]


def media_types(library: Library, name: str) -> list[str]:
    return [layer.media_type for layer in library.get(name).manifest.layers]


# -- remote clients and server paths ----------------------------------------------------------


@pytest.mark.parametrize("exists", [True, False])
def test_a_remote_client_learns_nothing_about_server_paths(tmp_path: Path, exists: bool) -> None:
    path = tmp_path / "secret.gguf"
    if exists:
        path.write_bytes(valid_file_bytes())
    other = "/no/such/file"
    # `files` values: a path is just a bad digest, with the message any bad value gets.
    for value in (str(path), other):
        with pytest.raises(InvalidDigest) as caught:
            plan_from_request(files={"m.gguf": value}, remote=True)
        assert caught.value.message.replace(value, "<value>") == (
            "invalid digest format: '<value>'; expected 'sha256:' followed by 64 lowercase hex characters"
        )
    # `path` (a server-side Modelfile): refused before the filesystem is consulted.
    with pytest.raises(InvalidInput) as caught:
        plan_from_modelfile(None, str(path), remote=True)
    assert caught.value.message == REMOTE_PATH_REFUSED
    # FROM in the Modelfile's text: always a model name for a remote client.
    plan = plan_from_modelfile(f"FROM {path}\n", None, remote=True)
    assert plan.base_model == str(path) and plan.files == ()


def test_the_service_refuses_a_path_for_a_remote_client(library: Library, tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(valid_file_bytes())
    plan = CreatePlan(files=(FileSource("model.gguf", path=path),))
    with pytest.raises(InvalidInput) as caught:
        run(library, "m", plan, remote=True)
    assert caught.value.message == REMOTE_PATH_REFUSED
    assert temp_files(library) == [] and list(library.blobs.stored_digests()) == []


def test_a_loopback_modelfile_path_resolves_files_next_to_it(tmp_path: Path, tiny: Digest) -> None:
    (tmp_path / "model.gguf").write_bytes(valid_file_bytes())
    (tmp_path / "lora.gguf").write_bytes(lora_bytes("llama"))
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text("FROM ./model.gguf\nADAPTER lora.gguf\nSYSTEM hi\nPARAMETER num_ctx 512\n")
    plan = plan_from_modelfile(None, str(modelfile), remote=False)
    assert plan.files == (FileSource("model.gguf", path=tmp_path / "model.gguf"),)
    assert plan.adapters == (FileSource("lora.gguf", path=tmp_path / "lora.gguf"),)
    assert plan.system == "hi" and plan.parameters == {"num_ctx": 512}
    # Blob references and model names, in the text form (no folder to be relative to).
    plan = plan_from_modelfile(f"FROM @{tiny}\nFROM ./model.gguf\n", None, remote=False)
    assert plan.files == (FileSource(tiny.filename, digest=tiny),) and plan.base_model == "./model.gguf"
    with pytest.raises(InvalidDigest):
        plan_from_modelfile("FROM @sha256-abc\n", None, remote=False)
    with pytest.raises(InvalidInput, match="path or modelfile are required"):
        plan_from_modelfile(None, None, remote=False)


def test_a_server_modelfile_path_must_be_a_small_regular_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        plan_from_modelfile(None, str(tmp_path / "missing"), remote=False)
    with pytest.raises(InvalidInput, match="not a regular file"):
        plan_from_modelfile(None, "/dev/zero", remote=False)


# -- request checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,message",
    [
        ({}, "neither 'from' or 'files' was specified"),
        ({"files": {"../m.gguf": "sha256:" + "a" * 64}}, "file path must be relative"),
        ({"files": {"a//m.gguf": "sha256:" + "a" * 64}}, "file path must be relative"),
        ({"files": {"model.safetensors": "sha256:" + "a" * 64}}, "safetensors models are not supported yet"),
        ({"files": {"m.gguf": ""}}, "invalid digest format"),
        ({"from": "m", "parameters": {"temprature": 1}}, "unknown parameter 'temprature'"),
        ({"from": "m", "parameters": {"top_k": "many"}}, 'option "top_k" must be of type integer'),
        ({"from": "m", "messages": [{"role": "robot", "content": "x"}]}, "role must be one of"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_message(fields: dict[str, Any], message: str) -> None:
    kwargs = {("from_" if key == "from" else key): value for key, value in fields.items()}
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        plan_from_request(remote=False, **kwargs)


def test_retired_parameters_are_dropped_and_license_may_be_one_string() -> None:
    plan = plan_from_request(from_="m", parameters={"mirostat": 1, "temperature": 0.5}, license="MIT", remote=True)
    assert plan.parameters == {"temperature": 0.5} and plan.licenses == ("MIT",)


# -- building ------------------------------------------------------------------------------------


def test_statuses_config_and_model_info_from_an_uploaded_gguf(library: Library, tiny: Digest) -> None:
    plan = plan_from_request(files={"tiny.gguf": str(tiny)}, system="be brief", remote=True)
    statuses = [item["status"] for item in run(library, "tiny", plan)]
    system = Digest.of_bytes(b"be brief")
    assert statuses == ["parsing GGUF", f"using existing layer {tiny}", f"creating new layer {system}",
                        "writing manifest", "success"]
    stored = library.get("tiny")
    model = stored.manifest.layers[0]
    assert (model.media_type, model.digest, model.from_) == (MODEL_LAYER, tiny, "tiny.gguf")
    config = library.config(stored.manifest)
    assert (config.model_family, config.model_families, config.model_type, config.file_type) == (
        "llama", ("llama",), "5K", "F16")
    assert library.model_info(tiny)["general.architecture"] == "llama"
    again = [item["status"] for item in run(library, "tiny2", plan)]
    assert f"using existing layer {system}" in again


def test_layers_follow_ollamas_assembly_order_and_parameters_merge(library: Library, tiny: Digest) -> None:
    base = ModelBuilder(library)
    base.add_blob(MODEL_LAYER, tiny, library.blobs.size(tiny))
    base.add_text(TEMPLATE_LAYER, "{{ .Prompt }}")
    base.add_json(PARAMS_LAYER, {"temperature": 1.0, "top_k": 64, "stop": ["a"]})
    base.add_text(LICENSE_LAYER, "base license")
    base.commit(ModelName.parse("base"), ModelConfig(model_family="llama", model_type="5K"))

    plan = plan_from_request(
        from_="base", template="{{ .System }} {{ .Prompt }}", system="sys", license=["extra"],
        parameters={"temperature": 0.5, "stop": ["b", "c"]},
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], remote=True,
    )
    run(library, "derived", plan)
    assert media_types(library, "derived") == [MODEL_LAYER, LICENSE_LAYER, TEMPLATE_LAYER, SYSTEM_LAYER,
                                                LICENSE_LAYER, PARAMS_LAYER, MESSAGES_LAYER]
    layers = library.get("derived").manifest.layers
    assert {layer.from_ for layer in layers[:2]} == {"base:latest"}  # provenance of inherited layers
    params = library.blobs.read_bytes(layers[5].digest, 1 << 20)
    assert params == b'{"stop":["b","c"],"temperature":0.5,"top_k":64}\n'  # request wins; sorted, as Ollama
    messages = library.blobs.read_bytes(layers[6].digest, 1 << 20)
    assert messages == b'[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"}]\n'
    assert library.config(library.get("derived").manifest).model_family == "llama"
    # Without new values, a derived model keeps the base's (parameters move after the licenses).
    run(library, "same", plan_from_request(from_="base", remote=True))
    assert media_types(library, "same") == [MODEL_LAYER, TEMPLATE_LAYER, LICENSE_LAYER, PARAMS_LAYER]


def test_replacing_a_tag_collects_what_only_the_old_model_used(library: Library, tiny: Digest) -> None:
    run(library, "m", plan_from_request(files={"tiny.gguf": str(tiny)}, system="one", remote=True))
    old_system = Digest.of_bytes(b"one")
    assert library.blobs.exists(old_system)
    run(library, "m", plan_from_request(from_="m", system="two", remote=True))
    assert not library.blobs.exists(old_system) and library.blobs.exists(tiny)
    assert library.get("m").manifest.layers[0].digest == tiny


def test_a_missing_base_model_or_blob(library: Library) -> None:
    with pytest.raises(ModelNotFound) as caught:
        run(library, "m", plan_from_request(from_="llama9", remote=True))
    assert caught.value.message == 'model "llama9" not found; pull it first with `berth pull llama9`'
    with pytest.raises(MissingBlob, match="upload it first with POST /api/blobs/"):
        run(library, "m", plan_from_request(files={"m.gguf": "sha256:" + "1" * 64}, remote=True))


@pytest.mark.parametrize(
    "data,message",
    [(b"not a model at all", NOT_GGUF_MESSAGE), (valid_file_bytes()[:-100], "past the end of the file")],
)
def test_an_invalid_gguf_leaves_no_model(library: Library, data: bytes, message: str) -> None:
    blob = library.blobs.write_bytes(data).digest
    with pytest.raises(InvalidGGUF, match=message):
        run(library, "bad", plan_from_request(files={"m.gguf": str(blob)}, remote=True))
    with pytest.raises(ModelNotFound):
        library.get("bad")


def test_adapters_must_be_loras_for_the_models_architecture(library: Library, tiny: Digest) -> None:
    good = library.blobs.write_bytes(lora_bytes("llama")).digest
    other = library.blobs.write_bytes(lora_bytes("gemma3")).digest
    files = {"m.gguf": str(tiny)}
    run(library, "with-lora", plan_from_request(files=files, adapters={"lora.gguf": str(good)}, remote=True))
    assert media_types(library, "with-lora") == [MODEL_LAYER, ADAPTER_LAYER]
    with pytest.raises(InvalidInput, match="for the 'gemma3' architecture but the model is 'llama'"):
        run(library, "x", plan_from_request(files=files, adapters={"lora.gguf": str(other)}, remote=True))
    with pytest.raises(InvalidInput, match="is not a LoRA adapter"):
        run(library, "x", plan_from_request(files=files, adapters={"lora.gguf": str(tiny)}, remote=True))
    with pytest.raises(InvalidInput, match="only one adapter is currently supported"):
        run(library, "x", plan_from_request(files=files, adapters={"a.gguf": str(good), "b.gguf": str(good)},
                                            remote=True))


def test_a_server_file_is_linked_and_published_only_when_the_model_is_made(library: Library, tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(valid_file_bytes())
    digest = Digest.of_bytes(path.read_bytes())
    plan = CreatePlan(files=(FileSource("model.gguf", path=path),), messages=(Message("user", "hi"),))
    progress = ModelCreator(library).create(ModelName.parse("linked"), plan, remote=False)
    assert next(progress) == {"status": "linked model.gguf"}
    assert len(temp_files(library)) == 1 and not library.blobs.exists(digest)  # staged, not published
    progress.close()  # the client went away (or the server stopped) half-way
    assert temp_files(library) == [] and not library.blobs.exists(digest)
    with pytest.raises(ModelNotFound):
        library.get("linked")

    statuses = [item["status"] for item in run(library, "linked", plan)]
    assert statuses[:3] == ["linked model.gguf", "parsing GGUF", f"creating new layer {digest}"]
    assert library.blob_path(digest).stat().st_ino == path.stat().st_ino
    assert library.get("linked").manifest.layers[0].from_ == "model.gguf"


def test_a_server_file_must_be_the_one_the_client_saw(library: Library, tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(valid_file_bytes())
    seen = FileIdentity.of(path.stat())
    elsewhere = {**dataclasses.asdict(seen), "inode": seen.inode + 1}  # as through a tunnel to another machine
    plan = plan_from_request(files={"m.gguf": str(path)}, file_identities={str(path): elsewhere}, remote=False)
    with pytest.raises(UnreadableFile, match="differs in device, inode, size or modification time"):
        run(library, "m", plan)
    assert temp_files(library) == []
    plan = plan_from_request(files={"m.gguf": str(path)}, file_identities={str(path): dataclasses.asdict(seen)},
                             remote=False)
    assert run(library, "m", plan)[-1] == {"status": "success"}
    with pytest.raises(InvalidInput, match="file_identities maps a path"):
        plan_from_request(files={"m.gguf": str(path)}, file_identities={str(path): {"inode": 1}}, remote=False)


def test_a_failing_adapter_leaves_the_staged_model_file_unpublished(library: Library, tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(valid_file_bytes())
    (tmp_path / "lora.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00")  # a 8-byte "GGUF" (CVE-2024-39720)
    plan = plan_from_request(files={"model.gguf": str(tmp_path / "model.gguf")},
                             adapters={"lora.gguf": str(tmp_path / "lora.gguf")}, remote=False)
    with pytest.raises(InvalidGGUF):
        run(library, "m", plan)
    assert temp_files(library) == [] and list(library.blobs.stored_digests()) == []


def test_parameters_json_matches_ollamas_bytes() -> None:
    # spec/ollama-registry.md §3.4 test vector (Ollama also escapes < and >; we keep them).
    from registry.modelfile_request import parameters_json

    values = OptionValues({"num_ctx": 4096, "temperature": 0.7, "stop": ("<|im_end|>",)})
    assert json.dumps(parameters_json(values), separators=(",", ":")) == (
        '{"num_ctx":4096,"stop":["<|im_end|>"],"temperature":0.7}')
