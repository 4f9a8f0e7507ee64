"""Serving models to other hosts under /v2/: a second Berth and skopeo pull from a live server."""

from __future__ import annotations

import hashlib
import json
import subprocess

import httpx
import pytest

from berth.registry.default_model import DEFAULT_MODEL_NAME
from tests.conftest import BerthServer, berth_executable

REPO = "library/gemma3"


def test_catalog_tags_and_manifest(http: httpx.Client) -> None:
    assert http.get("/v2/").status_code == 200
    assert REPO in http.get("/v2/_catalog").json()["repositories"]
    assert "270m" in http.get(f"/v2/{REPO}/tags/list").json()["tags"]
    response = http.get(f"/v2/{REPO}/manifests/270m")
    assert response.status_code == 200
    digest = "sha256:" + hashlib.sha256(response.content).hexdigest()
    assert response.headers["docker-content-digest"] == digest
    assert response.headers["content-type"].startswith("application/vnd.docker.distribution.manifest.v2+json")
    assert http.get(f"/v2/{REPO}/manifests/{digest}").content == response.content
    head = http.head(f"/v2/{REPO}/manifests/270m")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(response.content))


def test_blobs_with_ranges(http: httpx.Client) -> None:
    manifest = http.get(f"/v2/{REPO}/manifests/270m").json()
    layer = max(manifest["layers"], key=lambda l: l["size"])
    url = f"/v2/{REPO}/blobs/{layer['digest']}"
    head = http.head(url)
    assert head.status_code == 200 and int(head.headers["content-length"]) == layer["size"]
    part = http.get(url, headers={"Range": "bytes=0-3"})
    assert part.status_code == 206 and part.content == b"GGUF"
    assert part.headers["content-range"] == f"bytes 0-3/{layer['size']}"
    tail = http.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and len(tail.content) == 10
    beyond = http.get(url, headers={"Range": f"bytes={layer['size']}-"})
    assert beyond.status_code == 416 and beyond.json()["errors"][0]["code"] == "RANGE_INVALID"
    small = min(manifest["layers"], key=lambda l: l["size"])
    whole = http.get(f"/v2/{REPO}/blobs/{small['digest']}")
    assert "sha256:" + hashlib.sha256(whole.content).hexdigest() == small["digest"]


@pytest.mark.parametrize("path,code", [
    (f"/v2/{REPO}/manifests/nope", "MANIFEST_UNKNOWN"),
    ("/v2/library/../etc/manifests/latest", "NAME_UNKNOWN"),
    ("/v2/a/b/c/manifests/latest", "NAME_UNKNOWN"),
    (f"/v2/{REPO}/blobs/sha256:" + "0" * 64, "BLOB_UNKNOWN"),
    (f"/v2/{REPO}/blobs/sha256:../../x", "DIGEST_INVALID"),
    ("/v2/library/other/tags/list", "NAME_UNKNOWN"),
])
def test_errors(http: httpx.Client, path: str, code: str) -> None:
    response = http.get(path)
    assert response.status_code in (400, 404)
    assert response.json()["errors"][0]["code"] == code


def test_skopeo_inspects_what_berth_serves(server: BerthServer) -> None:
    result = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                             f"docker://{server.host}/{REPO}:270m"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layers"][0]["mediaType"] == "application/vnd.ollama.image.model"


def test_a_second_berth_pulls_from_the_first(server: BerthServer, fresh_server: BerthServer) -> None:
    source = f"{server.host}/{REPO}:270m"
    env = {**fresh_server.env(), "BERTH_NO_DEFAULT_MODEL": "1"}
    result = subprocess.run([berth_executable(), "pull", source, "--insecure"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = httpx.get(fresh_server.url + "/api/tags").json()["models"]
    pulled = next(m for m in listed if m["name"] == source)
    original = next(m for m in httpx.get(server.url + "/api/tags").json()["models"] if m["name"] == DEFAULT_MODEL_NAME)
    assert pulled["digest"] == original["digest"]  # the manifest bytes came across unchanged


def test_skopeo_copies_an_oci_model_from_berth(fresh_server: BerthServer, registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """skopeo copies OCI-manifest models (Docker v2 ones with Ollama layers it inspects only)."""
    env = fresh_server.env()
    oci_name = f"{registry.host}/team/gemma:oci"
    for args in (["cp", DEFAULT_MODEL_NAME, oci_name], ["push", oci_name, "--insecure", "--oci"],
                 ["rm", oci_name], ["pull", oci_name, "--insecure"]):
        result = subprocess.run([berth_executable(), *args], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    target = tmp_path / "copied"
    result = subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                             f"docker://{fresh_server.host}/team/gemma:oci", f"dir:{target}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    weights = max(manifest["layers"], key=lambda l: l["size"])
    copied = target / weights["digest"].split(":", 1)[1]
    assert hashlib.sha256(copied.read_bytes()).hexdigest() == weights["digest"].split(":", 1)[1]
