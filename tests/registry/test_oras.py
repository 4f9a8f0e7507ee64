"""oras-py (PyPI `oras`), an OCI artifact client, against what Berth pushes and pulls on a real registry.

Berth's own client does not build on oras (registry/oci.py says why); oras is here as a second,
independent client, like skopeo: it must pull what Berth pushed, and Berth must pull what it pushed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import oras.provider
import pytest

from berth.registry.credentials import CredentialStore
from berth.registry.digest import Digest
from berth.registry.library import Library
from berth.registry.manifest import DOCKER_CONFIG, DOCKER_MANIFEST, MODEL_LAYER, OCI_MANIFEST, ModelConfig
from berth.registry.names import ModelName
from berth.registry.oci import RegistryClient, RetryPolicy, Timeouts
from berth.registry.pull import WHOLE_BLOB_BYTES, Puller
from berth.registry.push import Pusher
from tests.registry_fixture import LocalRegistry, make_model


@pytest.fixture
def client(tmp_path: Path) -> Iterator[RegistryClient]:
    with RegistryClient(CredentialStore(tmp_path / "creds.json", tmp_path / "docker.json"), Timeouts(read=10),
                        RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)) as c:
        yield c


def _oras() -> oras.provider.Registry:
    return oras.provider.Registry(insecure=True)  # plain http to the loopback registry


@pytest.mark.parametrize("oci", [True, False], ids=["oci-manifest", "docker-v2-manifest"])
def test_oras_pulls_what_berth_pushed(registry: LocalRegistry, library: Library, client: RegistryClient,
                                      tmp_path: Path, oci: bool) -> None:
    name = f"{registry.host}/library/model:{'oci' if oci else 'v2'}"
    weights = os.urandom(WHOLE_BLOB_BYTES + 300_000)
    manifest = make_model(library, name, weights)
    Pusher(library, client).push(ModelName.parse(name), lambda e: None, insecure=True, oci=oci)

    served = _oras().get_manifest(name)
    assert served["mediaType"] == (OCI_MANIFEST if oci else DOCKER_MANIFEST)
    files = [Path(f) for f in _oras().pull(target=name, outdir=str(tmp_path / "out"))]
    # oras writes each layer (never the config) under its digest, these layers having no title.
    assert sorted(f"sha256:{hashlib.sha256(f.read_bytes()).hexdigest()}" for f in files) == sorted(
        str(d.digest) for d in manifest.layers)
    assert (tmp_path / "out" / str(manifest.layers[0].digest)).read_bytes() == weights


def test_berth_pulls_a_model_oras_pushed(registry: LocalRegistry, client: RegistryClient, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    weights = os.urandom(3 * WHOLE_BLOB_BYTES + 7)  # ranged, chunked and journalled on Berth's side
    (tmp_path / "model.gguf").write_bytes(weights)
    (tmp_path / "config.json").write_bytes(ModelConfig(model_family="test", model_type="1M").to_bytes())
    monkeypatch.chdir(tmp_path)  # oras pushes files under the working directory only
    name = f"{registry.host}/tools/oras-made:v1"
    pushed = _oras().push(target=name, files=[f"model.gguf:{MODEL_LAYER}"],
                          manifest_config=f"config.json:{DOCKER_CONFIG}", quiet=True)

    other = Library(tmp_path / "pulled")
    try:
        Puller(other, client, chunk_size=WHOLE_BLOB_BYTES).pull(ModelName.parse(name), lambda e: None,
                                                                insecure=True)
        stored = other.get(name)
        # Stored exactly as served: the model's digest is the registry's, annotations and all.
        assert stored.manifest.digest == Digest.parse(pushed.headers["Docker-Content-Digest"])
        assert stored.manifest.media_type == OCI_MANIFEST
        layer = stored.manifest.layers[0]
        assert layer.media_type == MODEL_LAYER
        assert json.loads(stored.manifest.raw)["layers"][0]["annotations"] == {
            "org.opencontainers.image.title": "model.gguf"}
        assert other.blobs.path(layer.digest).read_bytes() == weights
        assert other.config(stored.manifest).model_family == "test"
    finally:
        other.close()
