"""Importing an Ollama store: a fake one built from real files, manifests and digests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import pytest

from berth.registry.blobstore import TEMP_PREFIX
from berth.registry.builder import ModelBuilder
from berth.registry.digest import Digest
from berth.registry.errors import InvalidInput
from berth.registry.library import Library
from berth.registry.manifest import DOCKER_CONFIG, DOCKER_MANIFEST, MODEL_LAYER, PARAMS_LAYER, SYSTEM_LAYER, TEMPLATE_LAYER
from berth.registry.manifest import ModelConfig
from berth.registry.names import ModelName
from berth.registry.ollama_import import AlreadyPresent, Imported, Skipped, default_ollama_dir, import_store
from tests.registry.test_gguf import valid_file_bytes

WEIGHTS = valid_file_bytes()
CONFIG = b'{"model_format":"gguf","model_family":"llama","model_families":["llama"],"model_type":"5K",' \
         b'"file_type":"F16","architecture":"amd64","os":"linux"}\n'


def add_blob(root: Path, data: bytes, filename: str | None = None) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / (filename or f"sha256-{digest}")).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def add_manifest(root: Path, where: str, layers: list[tuple[str, dict[str, object]]],
                 config: dict[str, object] | None = None) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
           "config": {"mediaType": DOCKER_CONFIG, **(config or add_blob(root, CONFIG))},
           "layers": [{"mediaType": media_type, **desc} for media_type, desc in layers]}
    raw = json.dumps(doc, indent=2).encode()  # as a registry may serve it: kept byte for byte
    path = root / "manifests" / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return raw


def fake_ollama_store(root: Path) -> dict[str, bytes]:
    """Two good models sharing their weights, and one of each kind of bad entry."""
    weights = add_blob(root, WEIGHTS)
    good = {
        "registry.ollama.ai/library/tiny/latest": add_manifest(root, "registry.ollama.ai/library/tiny/latest", [
            (MODEL_LAYER, weights),
            (TEMPLATE_LAYER, add_blob(root, b"{{ .Prompt }}")),
            (PARAMS_LAYER, add_blob(root, b'{"temperature":0.5}\n'))]),
        "example.com:5000/team/tiny/v1": add_manifest(root, "example.com:5000/team/tiny/v1", [
            (MODEL_LAYER, weights), (SYSTEM_LAYER, add_blob(root, b"be brief"))]),
    }
    add_manifest(root, "registry.ollama.ai/library/bad name!/latest", [(MODEL_LAYER, weights)])
    add_manifest(root, "registry.ollama.ai/library/evil/latest",
                 [(MODEL_LAYER, {"digest": "sha256:../../../../etc/passwd", "size": 1})])
    add_manifest(root, "registry.ollama.ai/library/gone/latest",
                 [(MODEL_LAYER, {"digest": f"sha256:{'e' * 64}", "size": 5})])
    damaged = add_blob(root, b"original bytes")
    (root / "blobs" / f"sha256-{str(damaged['digest'])[7:]}").write_bytes(b"flipped bytes!")
    add_manifest(root, "registry.ollama.ai/library/damaged/latest", [(MODEL_LAYER, damaged)])
    (root / "manifests" / "registry.ollama.ai" / "library" / "stray").write_text("not a manifest")
    return good


@pytest.fixture
def library(tmp_path: Path) -> Iterator[Library]:
    lib = Library(tmp_path / "berth")
    yield lib
    lib.close()


def test_valid_manifests_are_registered_and_bad_ones_skipped(library: Library, tmp_path: Path) -> None:
    ollama = tmp_path / "ollama"
    good = fake_ollama_store(ollama)
    events = list(import_store(library, ollama))
    imported = {str(e.name): e for e in events if isinstance(e, Imported)}
    assert set(imported) == {"registry.ollama.ai/library/tiny:latest", "example.com:5000/team/tiny:v1"}
    skipped = {e.where: e.reason for e in events if isinstance(e, Skipped)}
    assert set(skipped) == {"registry.ollama.ai/library/bad name!/latest", "registry.ollama.ai/library/evil/latest",
                            "registry.ollama.ai/library/gone/latest", "registry.ollama.ai/library/damaged/latest",
                            "registry.ollama.ai/library/stray"}
    assert "invalid model name" in skipped["registry.ollama.ai/library/bad name!/latest"]
    assert "invalid digest format" in skipped["registry.ollama.ai/library/evil/latest"]
    assert "missing from the Ollama store; run `ollama pull gone:latest`" in skipped["registry.ollama.ai/library/gone/latest"]
    assert "digest mismatch" in skipped["registry.ollama.ai/library/damaged/latest"]
    assert "not a manifest" in skipped["registry.ollama.ai/library/stray"]

    for where, raw in good.items():
        host, namespace, model, tag = where.split("/")
        stored = library.get(ModelName(host, namespace, model, tag))
        assert stored.manifest.raw == raw and stored.manifest.digest == Digest.of_bytes(raw)  # same digest
    weights = Digest.of_bytes(WEIGHTS)
    assert library.blob_path(weights).stat().st_ino == (ollama / "blobs" / weights.filename).stat().st_ino
    assert library.model_info(weights)["general.architecture"] == "llama"
    assert library.config(library.get("tiny").manifest).model_family == "llama"
    # In path order: example.com first (weights, config, system), then tiny reuses two of them.
    first, second = imported["example.com:5000/team/tiny:v1"], imported["registry.ollama.ai/library/tiny:latest"]
    assert first.placed == {"hardlink": 3} and first.already_stored == 0 and first.warning is None
    assert second.placed == {"hardlink": 2} and second.already_stored == 2
    # The damaged blob was refused, not stored; no temporary file is left behind.
    assert not any(name.startswith(TEMP_PREFIX) for name in os.listdir(library.blobs.blobs_dir))
    assert len(list(library.blobs.stored_digests())) == 5


def test_importing_again_changes_nothing_and_a_different_model_is_not_replaced(library: Library,
                                                                               tmp_path: Path) -> None:
    ollama = tmp_path / "ollama"
    fake_ollama_store(ollama)
    list(import_store(library, ollama))
    again = [e for e in import_store(library, ollama) if not isinstance(e, Skipped)]
    assert all(isinstance(e, AlreadyPresent) for e in again) and len(again) == 2

    mine = ModelBuilder(library)
    mine.add_text(SYSTEM_LAYER, "mine")
    mine.commit(ModelName.parse("tiny"), ModelConfig())
    conflicts = [e for e in import_store(library, ollama) if isinstance(e, Skipped) and "tiny/latest" in e.where]
    assert len(conflicts) == 1 and "already has a different tiny:latest" in conflicts[0].reason
    assert library.text_layer(library.get("tiny").manifest.layers[0]) == "mine"


def test_blobs_named_the_pre_0_1_30_way_are_found(library: Library, tmp_path: Path) -> None:
    ollama = tmp_path / "ollama"
    weights = add_blob(ollama, WEIGHTS, filename=f"sha256:{hashlib.sha256(WEIGHTS).hexdigest()}")
    add_manifest(ollama, "registry.ollama.ai/library/old/latest", [(MODEL_LAYER, weights)])
    events = list(import_store(library, ollama))
    assert [type(e) for e in events] == [Imported]


def test_a_folder_that_is_not_an_ollama_store(library: Library, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="is not an Ollama models folder"):
        list(import_store(library, tmp_path))


def test_the_default_folder_follows_ollama_models() -> None:
    assert default_ollama_dir({"OLLAMA_MODELS": "/srv/ollama"}) == Path("/srv/ollama")
    assert default_ollama_dir({}) == Path("~/.ollama/models").expanduser()
