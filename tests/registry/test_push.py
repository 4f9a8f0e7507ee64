"""Push against a real registry (Debian's docker-registry), checked with skopeo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from berth.registry.credentials import Credential, CredentialStore
from berth.registry.library import Library
from berth.registry.manifest import OCI_MANIFEST
from berth.registry.names import ModelName
from berth.registry.oci import RegistryClient, RegistryUnauthorized, Timeouts, RetryPolicy
from berth.registry.pull import Puller
from berth.registry.push import Pusher, parse_range_end
from tests.registry_fixture import LocalRegistry, make_model

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[RegistryClient]:
    with RegistryClient(CredentialStore(tmp_path / "creds.json", tmp_path / "docker.json"),
                        Timeouts(read=10), FAST_RETRY) as c:
        yield c


def _events() -> tuple[list[dict[str, Any]], Any]:
    events: list[dict[str, Any]] = []
    return events, events.append


def test_push_then_pull_round_trip_and_repush_uploads_nothing(
        registry: LocalRegistry, library: Library, client: RegistryClient, tmp_path: Path) -> None:
    weights = os.urandom(5 * 1024 * 1024 + 123)
    name = f"{registry.host}/library/tiny:v1"
    manifest = make_model(library, name, weights)
    events, emit = _events()
    pusher = Pusher(library, client, chunk_size=1024 * 1024)
    result = pusher.push(ModelName.parse(name), emit, insecure=True)
    assert result.uploaded_bytes == sum(d.size for d in manifest.blobs())
    assert result.manifest_digest == manifest.digest
    statuses = [e["status"] for e in events]
    assert statuses[0] == "retrieving manifest" and statuses[-2:] == ["pushing manifest", "success"]
    layer = manifest.layers[0]
    pushing = [e for e in events if e["status"] == f"pushing {layer.digest.short}"]
    assert pushing[-1] == {"status": f"pushing {layer.digest.short}", "digest": str(layer.digest),
                           "total": layer.size, "completed": layer.size}

    again = pusher.push(ModelName.parse(name), lambda e: None, insecure=True)
    assert again.uploaded_bytes == 0

    other = Library(tmp_path / "other")
    try:
        events, emit = _events()
        pulled = Puller(other, client, chunk_size=1024 * 1024, parallel=4).pull(ModelName.parse(name), emit,
                                                                                 insecure=True)
        assert pulled.manifest.raw == manifest.raw
        assert other.get(name).manifest.digest == manifest.digest
        assert other.blobs.path(layer.digest).read_bytes() == weights
        statuses = [e["status"] for e in events]
        assert statuses[0] == "pulling manifest"
        assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    finally:
        other.close()


def test_parse_range_end() -> None:
    assert parse_range_end("0-1023") == 1024
    assert parse_range_end("0-0") == 0
    assert parse_range_end(None) == 0


def _skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("oci", [False, True])
def test_skopeo_inspects_what_berth_pushed(registry: LocalRegistry, library: Library, client: RegistryClient,
                                           oci: bool) -> None:
    name = f"{registry.host}/library/model:tag"
    manifest = make_model(library, name, os.urandom(300_000))
    result = Pusher(library, client).push(ModelName.parse(name), lambda e: None, insecure=True, oci=oci)
    raw = _skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{name}")
    assert raw.returncode == 0, raw.stderr
    doc = json.loads(raw.stdout)
    assert doc["mediaType"] == (OCI_MANIFEST if oci else manifest.media_type)
    assert [layer["digest"] for layer in doc["layers"]] == [str(d.digest) for d in manifest.layers]
    if not oci:
        assert raw.stdout.encode() == manifest.raw  # bytes unchanged: same digest remote and local
    if not oci:
        # skopeo's image view refuses Docker v2 manifests whose layers are not image layers;
        # that is why `--oci` exists. The raw manifest above is what OCI tools can read.
        return
    full = _skopeo("inspect", "--tls-verify=false", f"docker://{name}")
    assert full.returncode == 0, full.stderr
    info = json.loads(full.stdout)
    assert info["Digest"] == str(result.manifest_digest)
    assert info["Layers"] == [str(d.digest) for d in manifest.layers]


def test_skopeo_copies_an_oci_push_and_berth_pulls_the_copy(registry: LocalRegistry, library: Library,
                                                            client: RegistryClient, tmp_path: Path) -> None:
    name = f"{registry.host}/library/model:oci"
    weights = os.urandom(400_000)
    manifest = make_model(library, name, weights)
    Pusher(library, client).push(ModelName.parse(name), lambda e: None, insecure=True, oci=True)
    copied = f"{registry.host}/other/copy:v1"
    done = _skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false", f"docker://{name}",
                   f"docker://{copied}")
    assert done.returncode == 0, done.stderr

    other = Library(tmp_path / "pulled")
    try:
        Puller(other, client).pull(ModelName.parse(copied), lambda e: None, insecure=True)
        stored = other.get(copied)
        assert stored.manifest.media_type == OCI_MANIFEST
        assert [d.digest for d in stored.manifest.layers] == [d.digest for d in manifest.layers]
        assert other.blobs.path(manifest.layers[0].digest).read_bytes() == weights
        assert other.config(stored.manifest).model_family == "test"
    finally:
        other.close()


def test_basic_auth_registry_needs_a_login(auth_registry: LocalRegistry, library: Library, tmp_path: Path) -> None:
    name = f"{auth_registry.host}/library/secret:v1"
    make_model(library, name, os.urandom(200_000))
    store = CredentialStore(tmp_path / "creds.json", tmp_path / "docker.json")
    with RegistryClient(store, Timeouts(read=10), FAST_RETRY) as anonymous:
        with pytest.raises(RegistryUnauthorized, match="berth login"):
            Pusher(library, anonymous).push(ModelName.parse(name), lambda e: None, insecure=True)
    assert auth_registry.auth is not None
    user, password = auth_registry.auth
    store.save(auth_registry.host, Credential(user, "wrong"))
    with RegistryClient(store, Timeouts(read=10), FAST_RETRY) as wrong:
        with pytest.raises(RegistryUnauthorized):
            Pusher(library, wrong).push(ModelName.parse(name), lambda e: None, insecure=True)
    store.save(auth_registry.host, Credential(user, password))
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"
    with RegistryClient(store, Timeouts(read=10), FAST_RETRY) as logged_in:
        Pusher(library, logged_in).push(ModelName.parse(name), lambda e: None, insecure=True)
        other = Library(tmp_path / "pulled")
        try:
            Puller(other, logged_in).pull(ModelName.parse(name), lambda e: None, insecure=True)
            assert other.get(name).manifest.digest == library.get(name).manifest.digest
        finally:
            other.close()


def test_docker_config_credentials_are_a_fallback(tmp_path: Path) -> None:
    import base64

    docker = tmp_path / "docker.json"
    docker.write_text(json.dumps({"auths": {"https://reg.example:5000": {
        "auth": base64.b64encode(b"alice:pw:with:colons").decode()}}}))
    store = CredentialStore(tmp_path / "berth.json", docker)
    assert store.get("reg.example:5000") == Credential("alice", "pw:with:colons")
    store.save("reg.example:5000", Credential("bob", "x"))
    assert store.get("reg.example:5000") == Credential("bob", "x")
    assert store.remove("reg.example:5000") and store.get("reg.example:5000") == Credential("alice", "pw:with:colons")
    assert "pw" not in repr(store.get("reg.example:5000"))


def test_an_upload_location_on_another_host_gets_no_credentials(library: Library, tmp_path: Path) -> None:
    """A registry (Basic auth) names an upload Location on another host: the blob may go there,
    the user's password may not (nor may that host's 401 be answered with it)."""
    from berth.registry.oci import RegistryError
    from tests.fake_http import LoopbackServer, QuietHandler

    elsewhere: list[dict[str, str]] = []

    class Elsewhere(QuietHandler):
        def _record(self) -> None:
            elsewhere.append(dict(self.headers))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send(401, b"", {"WWW-Authenticate": 'Basic realm="elsewhere"'})

        do_PATCH = do_PUT = do_GET = _record

    other_host = LoopbackServer(Elsewhere)

    class Registry(QuietHandler):
        def _handle(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not (self.headers.get("Authorization") or "").startswith("Basic "):
                return self._send(401, b"", {"WWW-Authenticate": 'Basic realm="registry"'})
            if self.command == "HEAD":
                return self._send(404)
            if self.command == "POST" and "/blobs/uploads/" in self.path:
                # "localhost" is another origin than the 127.0.0.1 the registry is reached at.
                return self._send(202, b"", {"Location": f"http://localhost:{other_host.port}/upload/1"})
            self._send(404)

        do_HEAD = do_POST = do_GET = do_PUT = _handle

    registry = LoopbackServer(Registry)
    try:
        name = f"{registry.host}/library/m:v1"
        make_model(library, name, os.urandom(10_000))
        store = CredentialStore(tmp_path / "creds.json", tmp_path / "docker.json")
        store.save(registry.host, Credential("alice", "s3cret"))
        with RegistryClient(store, Timeouts(read=10), FAST_RETRY) as client:
            with pytest.raises(RegistryError):
                Pusher(library, client).push(ModelName.parse(name), lambda e: None, insecure=True)
        assert elsewhere, "the push never reached the upload host"
        assert all("Authorization" not in headers and "authorization" not in headers for headers in elsewhere)
    finally:
        registry.close()
        other_host.close()


def test_an_upload_location_may_not_downgrade_to_plain_http() -> None:
    from berth.registry.oci import RegistryRefused, Repository

    secure = Repository("reg.example", "library/m")
    assert secure.absolute("/v2/library/m/blobs/uploads/1") == "https://reg.example/v2/library/m/blobs/uploads/1"
    assert secure.absolute("https://storage.example/u/1") == "https://storage.example/u/1"
    with pytest.raises(RegistryRefused, match="only https"):
        secure.absolute("http://reg.example/v2/library/m/blobs/uploads/1")
    with pytest.raises(RegistryRefused):
        secure.absolute("file:///etc/passwd")
    assert Repository("reg.example", "library/m", insecure=True).absolute("http://x/u") == "http://x/u"
