"""The create service without HTTP: plans from both request shapes, layer assembly, statuses,
refusals of server paths, and what a failed or interrupted create leaves behind (nothing)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from berth.registry.blobstore import TEMP_PREFIX
from berth.registry.builder import ModelBuilder
from berth.registry.create import (
    PATHS_REFUSED,
    CreatePlan,
    FileSource,
    MissingBlob,
    ModelCreator,
    plan_from_modelfile,
    plan_from_request,
)
from berth.registry.digest import Digest
from berth.registry.errors import InvalidDigest, InvalidInput, ModelNotFound
from berth.registry.gguf import NOT_GGUF_MESSAGE, InvalidGGUF
from berth.registry.library import Library
from berth.registry.manifest import (
    ADAPTER_LAYER,
    LICENSE_LAYER,
    MESSAGES_LAYER,
    MODEL_LAYER,
    PARAMS_LAYER,
    SYSTEM_LAYER,
    TEMPLATE_LAYER,
    ModelConfig,
)
from berth.registry.modelfile import Message
from berth.registry.names import ModelName
from berth.registry.options import OptionValues
from tests.registry.test_gguf import F16, build, kv_str, tensor, valid_file_bytes


def lora_bytes(architecture: str) -> bytes:
    kvs = [kv_str("general.architecture", architecture), kv_str("general.type", "adapter")]
    return build(kvs, [tensor("blk.0.attn_q.weight.lora_a", [64, 8], F16, 0)], 64 * 8 * 2)


@pytest.fixture
def tiny(library: Library) -> Digest:
    """A small, valid llama GGUF, uploaded as a blob."""
    return library.blobs.write_bytes(valid_file_bytes()).digest


def run(library: Library, name: str, plan: CreatePlan) -> list[dict[str, Any]]:
    return list(ModelCreator(library).create(ModelName.parse(name), plan))


def temp_files(library: Library) -> list[str]:
    return [name for name in os.listdir(library.blobs.blobs_dir) if name.startswith(TEMP_PREFIX)]


def media_types(library: Library, name: str) -> list[str]:
    return [layer.media_type for layer in library.get(name).manifest.layers]


# -- server paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("exists", [True, False])
def test_no_client_learns_anything_about_server_paths(tmp_path: Path, exists: bool) -> None:
    """Every field that could name a server file gets PATHS_REFUSED, before any file is looked at."""
    path = tmp_path / "secret.gguf"
    if exists:
        path.write_bytes(valid_file_bytes())
    for value in (str(path), "/no/such/file", "./secret.gguf", "~/secret.gguf"):
        for attempt in (lambda: plan_from_request(files={"m.gguf": value}),
                        lambda: plan_from_request(from_="m", adapters={"a.gguf": value}),
                        lambda: plan_from_modelfile(None, value),
                        lambda: plan_from_modelfile(f"FROM {value}\n", None),
                        lambda: plan_from_modelfile(f"FROM m\nADAPTER {value}\n", None)):
            with pytest.raises(InvalidInput) as caught:
                attempt()
            assert caught.value.message == PATHS_REFUSED


def test_the_early_2024_text_names_blobs_and_models(tiny: Digest) -> None:
    plan = plan_from_modelfile(f"FROM @{tiny}\nFROM llama3.2\nSYSTEM hi\nPARAMETER num_ctx 512\n", "/ignored/Modelfile")
    assert plan.files == (FileSource(tiny.filename, tiny),) and plan.base_model == "llama3.2"
    assert plan.system == "hi" and plan.parameters == {"num_ctx": 512}
    with pytest.raises(InvalidDigest):
        plan_from_modelfile("FROM @sha256-abc\n", None)
    with pytest.raises(InvalidInput, match="path or modelfile are required"):
        plan_from_modelfile(None, None)


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
        plan_from_request(**kwargs)


def test_retired_parameters_are_dropped_and_license_may_be_one_string() -> None:
    plan = plan_from_request(from_="m", parameters={"mirostat": 1, "temperature": 0.5}, license="MIT")
    assert plan.parameters == {"temperature": 0.5} and plan.licenses == ("MIT",)


# -- building ------------------------------------------------------------------------------------


def test_statuses_config_and_model_info_from_an_uploaded_gguf(library: Library, tiny: Digest) -> None:
    plan = plan_from_request(files={"tiny.gguf": str(tiny)}, system="be brief")
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
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
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
    run(library, "same", plan_from_request(from_="base"))
    assert media_types(library, "same") == [MODEL_LAYER, TEMPLATE_LAYER, LICENSE_LAYER, PARAMS_LAYER]


def test_replacing_a_tag_collects_what_only_the_old_model_used(library: Library, tiny: Digest) -> None:
    run(library, "m", plan_from_request(files={"tiny.gguf": str(tiny)}, system="one"))
    old_system = Digest.of_bytes(b"one")
    assert library.blobs.exists(old_system)
    run(library, "m", plan_from_request(from_="m", system="two"))
    assert not library.blobs.exists(old_system) and library.blobs.exists(tiny)
    assert library.get("m").manifest.layers[0].digest == tiny


def test_a_missing_base_model_or_blob(library: Library) -> None:
    with pytest.raises(ModelNotFound) as caught:
        run(library, "m", plan_from_request(from_="llama9"))
    assert caught.value.message == 'model "llama9" not found; pull it first with `berth pull llama9`'
    with pytest.raises(MissingBlob, match="upload it first with POST /api/blobs/"):
        run(library, "m", plan_from_request(files={"m.gguf": "sha256:" + "1" * 64}))


@pytest.mark.parametrize(
    "data,message",
    [(b"not a model at all", NOT_GGUF_MESSAGE), (valid_file_bytes()[:-100], "past the end of the file")],
)
def test_an_invalid_gguf_leaves_no_model(library: Library, data: bytes, message: str) -> None:
    blob = library.blobs.write_bytes(data).digest
    with pytest.raises(InvalidGGUF, match=message):
        run(library, "bad", plan_from_request(files={"m.gguf": str(blob)}))
    with pytest.raises(ModelNotFound):
        library.get("bad")


def test_adapters_must_be_loras_for_the_models_architecture(library: Library, tiny: Digest) -> None:
    good = library.blobs.write_bytes(lora_bytes("llama")).digest
    other = library.blobs.write_bytes(lora_bytes("gemma3")).digest
    files = {"m.gguf": str(tiny)}
    run(library, "with-lora", plan_from_request(files=files, adapters={"lora.gguf": str(good)}))
    assert media_types(library, "with-lora") == [MODEL_LAYER, ADAPTER_LAYER]
    with pytest.raises(InvalidInput, match="for the 'gemma3' architecture but the model is 'llama'"):
        run(library, "x", plan_from_request(files=files, adapters={"lora.gguf": str(other)}))
    with pytest.raises(InvalidInput, match="is not a LoRA adapter"):
        run(library, "x", plan_from_request(files=files, adapters={"lora.gguf": str(tiny)}))
    with pytest.raises(InvalidInput, match="only one adapter is currently supported"):
        run(library, "x", plan_from_request(files=files, adapters={"a.gguf": str(good), "b.gguf": str(good)}))


def test_parameters_json_matches_ollamas_bytes() -> None:
    # spec/ollama-registry.md §3.4 test vector (Ollama also escapes < and >; we keep them).
    from berth.registry.modelfile_request import parameters_json

    values = OptionValues({"num_ctx": 4096, "temperature": 0.7, "stop": ("<|im_end|>",)})
    assert json.dumps(parameters_json(values), separators=(",", ":")) == (
        '{"num_ctx":4096,"stop":["<|im_end|>"],"temperature":0.7}')
