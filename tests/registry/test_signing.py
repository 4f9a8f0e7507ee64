"""The user's ed25519 key: Ollama-style signed token requests, checked by a token server of our own
that really verifies the signature with `cryptography`; and signed models (registry/signing.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlsplit

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from berth.registry.credentials import CredentialStore
from berth.registry.digest import Digest
from berth.registry.errors import InvalidInput
from berth.registry.library import Library
from berth.registry.manifest import DOCKER_CONFIG, DOCKER_MANIFEST, MODEL_LAYER, OCI_MANIFEST
from berth.registry.names import ModelName
from berth.registry.oci import RegistryClient, RegistryUnauthorized, Repository, RetryPolicy, Timeouts
from berth.registry.ollama_auth import EMPTY_BODY_DIGEST, OllamaKeySigner
from berth.registry.pull import Puller
from berth.registry.push import Pusher
from berth.registry.signing import SIGNATURE_TYPE, Signatures, key_id, parse_public_key, payload_for, signature_tag
from berth.registry.trust import TrustMode, TrustPolicy, UntrustedModel
from berth.registry.user_key import UserKey, load_or_create_key
from tests.fake_http import LoopbackServer, QuietHandler
from tests.registry_fixture import LocalRegistry, make_model

FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05)


class OllamaStyleRegistry:
    """Serves one model behind Bearer tokens that its `/token` endpoint issues only for requests
    signed (spec §6) by one of `authorized` public keys."""

    def __init__(self) -> None:
        self.authorized: set[str] = set()  # public key blobs (the base64 field of the .pub line)
        self.token_requests: list[tuple[str, str]] = []  # (url, verdict)
        self.issued: set[str] = set()
        self.blobs: dict[str, bytes] = {}
        self.manifest = b""
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/token"):
                    verdict = outer.verify(self.command, f"http://{self.headers['Host']}{self.path}",
                                           self.headers.get("Authorization", ""))
                    outer.token_requests.append((self.path, verdict))
                    if verdict != "ok":
                        return self._send(401, json.dumps({"error": verdict}).encode())
                    token = base64.urlsafe_b64encode(os.urandom(12)).decode()
                    outer.issued.add(token)
                    return self._send(200, json.dumps({"token": token}).encode())
                auth = self.headers.get("Authorization", "")
                if auth.removeprefix("Bearer ") not in outer.issued:
                    return self._send(401, b"", {"WWW-Authenticate": (
                        f'Bearer realm="http://{self.headers["Host"]}/token",service="ollama.test",'
                        'scope="repository:library/m:pull"')})
                if "/manifests/" in self.path:
                    return self._send(200, outer.manifest, {"Content-Type": DOCKER_MANIFEST})
                data = outer.blobs.get(self.path.rsplit("/", 1)[1])
                if data is None:
                    return self._send(404)
                start, end = 0, len(data) - 1
                if self.headers.get("Range"):
                    first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
                    start, end = int(first), min(int(last or end), end)
                    return self._send(206, data[start:end + 1],
                                      {"Content-Range": f"bytes {start}-{end}/{len(data)}"})
                self._send(200, data)

            do_HEAD = do_GET

        self.http = LoopbackServer(Handler)
        self.host = self.http.host

    def verify(self, method: str, url: str, authorization: str) -> str:
        """Check a token request exactly as spec §6 describes the signature; returns "ok" or why not."""
        blob, sep, signature = authorization.partition(":")
        if not sep:
            return "unsigned"
        if blob not in self.authorized:
            return "unknown key"
        key = load_ssh_public_key(f"ssh-ed25519 {blob}".encode())
        assert isinstance(key, Ed25519PublicKey)
        try:
            key.verify(base64.b64decode(signature), f"{method},{url},{EMPTY_BODY_DIGEST}".encode())
        except (InvalidSignature, ValueError):
            return "bad signature"
        query = parse_qsl(urlsplit(url).query)
        keys = [k for k, _ in query]
        if keys != sorted(keys) or not {"nonce", "scope", "service", "ts"} <= set(keys):
            return f"query keys {keys}"
        if abs(time.time() - int(dict(query)["ts"])) > 60:
            return "stale"
        return "ok"

    def serve_model(self, weights: bytes) -> Digest:
        config = b'{"model_format":"gguf","model_family":"test"}'
        wd, cd = hashlib.sha256(weights).hexdigest(), hashlib.sha256(config).hexdigest()
        self.blobs = {f"sha256:{wd}": weights, f"sha256:{cd}": config}
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": f"sha256:{cd}", "size": len(config)},
            "layers": [{"mediaType": MODEL_LAYER, "digest": f"sha256:{wd}", "size": len(weights)}]}).encode()
        return Digest(wd)

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def ollama_registry() -> Iterator[OllamaStyleRegistry]:
    server = OllamaStyleRegistry()
    yield server
    server.close()


def _client(tmp_path: Path, signer: OllamaKeySigner | None) -> RegistryClient:
    return RegistryClient(CredentialStore(tmp_path / "creds.json", tmp_path / "docker.json"),
                          Timeouts(connect=2, read=5), FAST_RETRY, signer=signer)


def test_key_is_created_on_first_use_as_openssh_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    key = load_or_create_key(home)
    private, public = home / "id_ed25519", home / "id_ed25519.pub"
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public.read_text().split()[:2] == key.public_line().split()
    assert public.read_text().startswith("ssh-ed25519 AAAA")
    assert load_or_create_key(home).public_line() == key.public_line()  # loaded, not replaced
    if shutil.which("ssh-keygen"):
        derived = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True)
        assert derived.stdout.split()[:2] == key.public_line().split()


def test_pull_with_a_signed_token_request(ollama_registry: OllamaStyleRegistry, tmp_path: Path) -> None:
    weights = os.urandom(300_000)
    digest = ollama_registry.serve_model(weights)
    signer = OllamaKeySigner(tmp_path / "home", hosts={ollama_registry.host})
    ollama_registry.authorized.add(signer.keys.get().public_blob())
    library = Library(tmp_path / "models")
    try:
        with _client(tmp_path, signer) as client:
            Puller(library, client).pull(ModelName.parse(f"{ollama_registry.host}/library/m:latest"),
                                         lambda e: None, insecure=True)
        assert library.blobs.path(digest).read_bytes() == weights
    finally:
        library.close()
    assert ollama_registry.token_requests and all(v == "ok" for _, v in ollama_registry.token_requests)
    path = ollama_registry.token_requests[0][0]
    assert [k for k, _ in parse_qsl(urlsplit(path).query)] == ["nonce", "scope", "service", "ts"]


def test_unknown_key_and_unsigned_requests_are_refused(ollama_registry: OllamaStyleRegistry, tmp_path: Path) -> None:
    ollama_registry.serve_model(b"weights")
    ollama_registry.authorized.add(load_or_create_key(tmp_path / "someone-else").public_blob())
    name = ModelName.parse(f"{ollama_registry.host}/library/m:latest")
    library = Library(tmp_path / "models")
    try:
        signer = OllamaKeySigner(tmp_path / "home", hosts={ollama_registry.host})
        with _client(tmp_path, signer) as client, pytest.raises(RegistryUnauthorized):
            Puller(library, client).pull(name, lambda e: None, insecure=True)
        # A signer that does not cover this host signs nothing (other registries never see our key).
        with _client(tmp_path, OllamaKeySigner(tmp_path / "home")) as client, pytest.raises(RegistryUnauthorized):
            Puller(library, client).pull(name, lambda e: None, insecure=True)
        assert library.names() == []
    finally:
        library.close()
    assert [v for _, v in ollama_registry.token_requests] == ["unknown key", "unsigned"]


# -- signed models ---------------------------------------------------------------------------------------

def _plain_client(tmp_path: Path) -> RegistryClient:
    return _client(tmp_path, None)


def _push(library: Library, registry: LocalRegistry, tmp_path: Path, tag: str, key: UserKey | None,
          oci: bool = False) -> tuple[ModelName, Digest]:
    name = f"{registry.host}/team/model:{tag}"
    make_model(library, name, os.urandom(200_000) + tag.encode())
    events: list[dict[str, Any]] = []
    with _plain_client(tmp_path) as client:
        result = Pusher(library, client).push(ModelName.parse(name), events.append, insecure=True, oci=oci, sign=key)
    assert ("pushing signature" in [e["status"] for e in events]) == (key is not None)
    return ModelName.parse(name), result.manifest_digest


def _policy(registry: LocalRegistry, mode: str, *keys: UserKey) -> TrustPolicy:
    return TrustPolicy.from_env({"BERTH_TRUST_POLICY": json.dumps({"rules": [
        {"scope": f"{registry.host}/team", "mode": mode, "keys": [k.public_line() for k in keys]}]})})


def _signature_tag_manifest(client: RegistryClient, repo: Repository, digest: Digest) -> bytes:
    tagged = client.request("GET", repo.manifest_url(signature_tag(digest)), repo, repo.scope("pull"),
                            headers={"Accept": OCI_MANIFEST})
    try:
        return tagged.read()
    finally:
        tagged.close()


def test_signature_is_stored_with_the_tag_fallback_and_verifies(registry: LocalRegistry, library: Library,
                                                                 tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "home")
    name, digest = _push(library, registry, tmp_path, "signed", key)
    repo = Repository.of(name, insecure=True)
    with _plain_client(tmp_path) as client:
        # docker-registry 2.8 has no referrers API: the push fell back to the cosign-style tag.
        doc = json.loads(_signature_tag_manifest(client, repo, digest))
        assert doc["artifactType"] == SIGNATURE_TYPE and doc["subject"]["digest"] == str(digest)
        check = Signatures(client).check(repo, digest, [key.public])
        assert check.verified and check.trusted_by == (key_id(key.public),)
        stranger = load_or_create_key(tmp_path / "stranger")
        assert not Signatures(client).check(repo, digest, [stranger.public]).verified


def test_openssl_verifies_a_berth_signature(registry: LocalRegistry, library: Library, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key = load_or_create_key(tmp_path / "home")
    name, digest = _push(library, registry, tmp_path, "openssl", key, oci=True)
    with _plain_client(tmp_path) as client:
        [envelope] = Signatures(client).envelopes(Repository.of(name, insecure=True), digest)
    doc = json.loads(envelope)
    (tmp_path / "payload.json").write_bytes(base64.b64decode(doc["payload"]))
    (tmp_path / "payload.sig").write_bytes(base64.b64decode(doc["signature"]))
    (tmp_path / "signer.pem").write_text(doc["publicKeyPem"])

    def openssl_verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "signer.pem"),
                               "-rawin", "-in", str(tmp_path / "payload.json"),
                               "-sigfile", str(tmp_path / "payload.sig")], capture_output=True, text=True)

    verified = openssl_verify()
    assert verified.returncode == 0 and "Signature Verified Successfully" in verified.stdout, verified.stderr
    payload = json.loads((tmp_path / "payload.json").read_text())
    assert payload["critical"]["image"]["docker-manifest-digest"] == str(digest)
    # A payload naming another manifest does not verify.
    (tmp_path / "payload.json").write_bytes(payload_for(Digest.of_bytes(b"other")))
    assert openssl_verify().returncode != 0


def test_enforce_refuses_unsigned_and_wrongly_signed_models_before_anything_is_tagged(
        registry: LocalRegistry, library: Library, tmp_path: Path) -> None:
    trusted = load_or_create_key(tmp_path / "trusted")
    other = load_or_create_key(tmp_path / "other")
    unsigned, _ = _push(library, registry, tmp_path, "unsigned", None)
    wrong, _ = _push(library, registry, tmp_path, "wrong", other)
    good, _ = _push(library, registry, tmp_path, "good", trusted)
    target = Library(tmp_path / "pulled")
    try:
        with _plain_client(tmp_path) as client:
            puller = Puller(target, client, trust=_policy(registry, "enforce", trusted))
            for name, why in ((unsigned, "is not signed"), (wrong, "none valid")):
                with pytest.raises(UntrustedModel, match=why):
                    puller.pull(name, lambda e: None, insecure=True)
            assert target.names() == [] and not any(target.blobs.blobs_dir.iterdir())
            events: list[dict[str, Any]] = []
            puller.pull(good, events.append, insecure=True)
            assert "verifying signature" in [e["status"] for e in events]
            assert [str(n) for n in target.names()] == [str(good)]

            warned: list[dict[str, Any]] = []
            Puller(target, client, trust=_policy(registry, "warn", trusted)).pull(unsigned, warned.append,
                                                                                  insecure=True)
            assert any(e["status"].startswith("warning: ") and "not signed" in e["status"] for e in warned)
    finally:
        target.close()


def test_trust_policy_scopes_and_sources(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "k")
    doc = {"default": "warn", "rules": [
        {"scope": "reg.example/team", "mode": "enforce", "keys": [key.public_line()]},
        {"scope": "reg.example/team/open", "mode": "off"}]}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc))
    for source in (json.dumps(doc), str(path)):
        policy = TrustPolicy.from_env({"BERTH_TRUST_POLICY": source})
        assert policy.rule_for("reg.example", "team/model").mode is TrustMode.ENFORCE
        assert policy.rule_for("reg.example", "team/open/x").mode is TrustMode.OFF
        assert policy.rule_for("reg.example", "teamx/model").mode is TrustMode.WARN
        # The same registry written otherwise is the same registry; another port is another one.
        for host in ("reg.example:443", "REG.example.", "reg.example.:443"):
            assert policy.rule_for(host, "team/model").mode is TrustMode.ENFORCE
        assert policy.rule_for("reg.example:5000", "team/model").mode is TrustMode.WARN
    assert TrustPolicy.from_env({}).rule_for("any", "thing").mode is TrustMode.OFF
    with pytest.raises(InvalidInput, match="trusts no key"):
        TrustPolicy.parse({"rules": [{"scope": "r/x", "mode": "enforce"}]})
    with pytest.raises(InvalidInput):
        TrustPolicy.parse({"rules": [{"scope": "r/x", "mode": "sometimes", "keys": [key.public_line()]}]})


def test_berth_verify_and_berth_key(registry: LocalRegistry, library: Library, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from berth.cli import transfer
    from berth.cli.client import ClientError

    monkeypatch.setenv("BERTH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BERTH_TRUST_POLICY", raising=False)
    key = load_or_create_key(tmp_path / "home")
    assert transfer.public_key() == key.public_line()
    pem = transfer.public_key(pem=True)
    assert pem.startswith("-----BEGIN PUBLIC KEY-----") and parse_public_key(pem) == key.public
    signed, digest = _push(library, registry, tmp_path, "v", key)
    unsigned, _ = _push(library, registry, tmp_path, "u", None)
    assert str(digest) in transfer.verify(str(signed), insecure=True, keys=[key.public_line()])
    with pytest.raises(ClientError, match="NOT verified: no signature"):
        transfer.verify(str(unsigned), insecure=True, keys=[key.public_line()])
    with pytest.raises(ClientError, match="no trusted keys"):
        transfer.verify(str(signed), insecure=True)
    (tmp_path / "policy.json").write_text(json.dumps({"rules": [
        {"scope": registry.host, "mode": "enforce", "keys": [load_or_create_key(tmp_path / "x").public_line()]}]}))
    monkeypatch.setenv("BERTH_TRUST_POLICY", str(tmp_path / "policy.json"))
    with pytest.raises(ClientError, match="none by a trusted key"):
        transfer.verify(str(signed), insecure=True)


# -- the referrers API (OCI distribution 1.1) ---------------------------------------------------------

class FakeReferrersRegistry:
    """A fake OCI 1.1 registry, in memory: blobs (HEAD, GET, POST + PATCH + PUT uploads), manifests
    by tag or digest, and `GET /v2/<repo>/referrers/<digest>` answering `OCI-Subject` on pushes with a
    subject. Debian's docker-registry (2.8) predates the referrers API, so this stands in for Zot,
    Harbor or distribution 3 to exercise that path."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}  # (repo, tag or digest) -> body, type
        self.requests: list[tuple[str, str]] = []
        self.uploads: dict[str, bytearray] = {}
        fake = self

        class Handler(QuietHandler):
            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _route(self) -> tuple[str, str, str, dict[str, str]]:
                parts = urlsplit(self.path)
                path = parts.path.removeprefix("/v2/")
                for kind in ("/blobs/uploads/", "/blobs/", "/manifests/", "/referrers/"):
                    if kind in path:
                        repo, _, ref = path.partition(kind)
                        return repo, kind, ref, dict(parse_qsl(parts.query))
                return "", path, "", {}

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                fake.requests.append((self.command, self.path))
                repo, kind, ref, query = self._route()
                if kind == "/blobs/" and ref in fake.blobs:
                    return self._send(200, fake.blobs[ref], {"Docker-Content-Digest": ref})
                if kind == "/manifests/" and (repo, ref) in fake.manifests:
                    body, media_type = fake.manifests[(repo, ref)]
                    return self._send(200, body, {"Content-Type": media_type,
                                                  "Docker-Content-Digest": str(Digest.of_bytes(body))})
                if kind == "/referrers/":
                    found = []
                    for (r, reference), (body, media_type) in fake.manifests.items():
                        doc = json.loads(body)
                        if r == repo and reference.startswith("sha256:") \
                                and doc.get("subject", {}).get("digest") == ref \
                                and query.get("artifactType") in (None, doc.get("artifactType")):
                            found.append({"mediaType": media_type, "digest": reference, "size": len(body),
                                          "artifactType": doc.get("artifactType")})
                    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                        "manifests": found}).encode()
                    return self._send(200, index, {"Content-Type": "application/vnd.oci.image.index.v1+json",
                                                   "OCI-Filters-Applied": "artifactType"})
                self._send(404, b'{"errors":[{"code":"NOT_FOUND","message":"unknown"}]}')

            def do_POST(self) -> None:
                fake.requests.append((self.command, self.path))
                repo, kind, _, _ = self._route()
                self._body()
                upload = f"u{len(fake.uploads)}"
                fake.uploads[upload] = bytearray()
                self._send(202, b"", {"Location": f"/v2/{repo}/blobs/uploads/{upload}"})

            def do_PATCH(self) -> None:
                fake.requests.append((self.command, self.path))
                repo, _, upload, _ = self._route()
                fake.uploads[upload] += self._body()
                self._send(202, b"", {"Location": f"/v2/{repo}/blobs/uploads/{upload}",
                                      "Range": f"0-{len(fake.uploads[upload]) - 1}"})

            def do_PUT(self) -> None:
                fake.requests.append((self.command, self.path))
                repo, kind, ref, query = self._route()
                body = self._body()
                if kind == "/blobs/uploads/":
                    data = bytes(fake.uploads.pop(ref)) + body
                    if str(Digest.of_bytes(data)) != query.get("digest"):
                        return self._send(400, b'{"errors":[{"code":"DIGEST_INVALID","message":"bad"}]}')
                    fake.blobs[query["digest"]] = data
                    return self._send(201, b"", {"Docker-Content-Digest": query["digest"]})
                digest = str(Digest.of_bytes(body))
                media_type = self.headers.get("Content-Type", OCI_MANIFEST)
                fake.manifests[(repo, ref)] = fake.manifests[(repo, digest)] = (body, media_type)
                headers = {"Docker-Content-Digest": digest}
                subject = json.loads(body).get("subject")
                if subject:
                    headers["OCI-Subject"] = subject["digest"]
                self._send(201, b"", headers)

        self.http = LoopbackServer(Handler)
        self.host = self.http.host

    def close(self) -> None:
        self.http.close()


def test_signatures_go_through_the_referrers_api_where_a_registry_has_it(library: Library, tmp_path: Path) -> None:
    fake = FakeReferrersRegistry()
    try:
        key = load_or_create_key(tmp_path / "home")
        name, digest = _push(library, fake, tmp_path, "signed", key)  # type: ignore[arg-type]
        repo = Repository.of(name, insecure=True)
        # The registry answered OCI-Subject, so no sha256-<hex>.sig fallback tag was pushed.
        assert (repo.path, signature_tag(digest)) not in fake.manifests
        assert not any(signature_tag(digest) in path for _, path in fake.requests)
        fake.requests.clear()
        with _plain_client(tmp_path) as client:
            check = Signatures(client).check(repo, digest, [key.public])
        assert check.verified and check.found == 1
        assert any(method == "GET" and f"/referrers/{digest}" in path for method, path in fake.requests)

        # A pull under an enforcing policy finds the signature the same way and tags the model.
        other, third = Library(tmp_path / "other"), Library(tmp_path / "third")
        try:
            with _plain_client(tmp_path) as client:
                Puller(other, client, trust=_policy(fake, "enforce", key)).pull(  # type: ignore[arg-type]
                    name, lambda e: None, insecure=True)
            assert other.get(str(name)).manifest.digest == digest
            stranger = load_or_create_key(tmp_path / "stranger")
            with _plain_client(tmp_path) as client, pytest.raises(UntrustedModel):
                Puller(third, client, trust=_policy(fake, "enforce", stranger)).pull(  # type: ignore[arg-type]
                    name, lambda e: None, insecure=True)
            assert third.names() == []
        finally:
            other.close()
            third.close()
    finally:
        fake.close()


def test_a_second_signer_of_the_same_model_keeps_the_first_signature(registry: LocalRegistry, library: Library,
                                                                     tmp_path: Path) -> None:
    """Without the referrers API every signature of a digest lives under one tag: a second signed
    push of the same model adds its envelope there instead of replacing the first signer's."""
    first, second = load_or_create_key(tmp_path / "a"), load_or_create_key(tmp_path / "b")
    name, digest = _push(library, registry, tmp_path, "shared", first)
    with _plain_client(tmp_path) as client:
        Pusher(library, client).push(name, lambda e: None, insecure=True, sign=second)
        repo = Repository.of(name, insecure=True)
        assert Signatures(client).check(repo, digest, [first.public]).verified
        assert Signatures(client).check(repo, digest, [second.public]).verified
        Pusher(library, client).push(name, lambda e: None, insecure=True, sign=second)  # again: no duplicate
        assert len(Signatures(client).envelopes(repo, digest)) == 2


def test_another_tools_signatures_under_the_tag_are_not_overwritten(registry: LocalRegistry, library: Library,
                                                                    tmp_path: Path) -> None:
    from berth.registry.blob_upload import upload_bytes
    from berth.registry.signing import EMPTY_CONFIG, SignatureError

    name, digest = _push(library, registry, tmp_path, "cosigned", None)
    repo = Repository.of(name, insecure=True)
    with _plain_client(tmp_path) as client:
        config = upload_bytes(client, repo, EMPTY_CONFIG)
        foreign = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [], "config": {
            "mediaType": "application/vnd.oci.empty.v1+json", "digest": str(config), "size": 2}}).encode()
        client.request("PUT", repo.manifest_url(signature_tag(digest)), repo, repo.scope("pull", "push"),
                       headers={"Content-Type": OCI_MANIFEST}, content=foreign, ok=(201,)).close()
        with pytest.raises(SignatureError, match="will not overwrite"):
            Pusher(library, client).push(name, lambda e: None, insecure=True, sign=load_or_create_key(tmp_path / "k"))
        assert _signature_tag_manifest(client, repo, digest) == foreign
