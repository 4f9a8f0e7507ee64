"""Signed models: an ed25519 signature over a manifest digest, stored in the registry beside it.

Format (version 1), meant to be checkable without Berth:

* **Payload**: the compact JSON (no spaces, keys in this order)
  `{"critical":{"image":{"docker-manifest-digest":"sha256:<hex>"},"type":"berth signature"}}`
  naming the digest of the signed manifest's bytes, as the registry serves them.
* **Signature**: plain Ed25519 (RFC 8032, no pre-hash) of the payload bytes, by the signer's key
  (`$BERTH_HOME/id_ed25519`, the key `berth key` prints).
* **Envelope**: a JSON blob of media type `application/vnd.berth.signature.v1+json`:
  `{"payload": base64(payload), "signature": base64(64-byte signature),
    "publicKey": "ssh-ed25519 AAAA…", "publicKeyPem": "-----BEGIN PUBLIC KEY-----…"}`.
  The public key is a hint for humans; a verifier trusts only the keys in its own policy.
* **Storage**: an OCI image manifest with `artifactType` `application/vnd.berth.signature.v1+json`,
  the OCI empty config (`{}`), the envelope as its one layer and `subject` = the signed manifest's
  descriptor, pushed by digest. A registry with the OCI 1.1 referrers API lists it under
  `GET /v2/<repo>/referrers/<digest>`; for registries without it (it answers the push without an
  `OCI-Subject` header) the signatures are also tagged `sha256-<hex>.sig`, as cosign does: one
  manifest with every Berth envelope for that digest as its layers (a second signer adds to it).
* **What it vouches for**: the content, by digest, not the name it is pulled under. A registry
  that answers a tag with another manifest the same key signed (another model, or an older version
  of this one) passes the check, so a trust scope's keys should be ones that sign only what may be
  pulled under that scope.

Verifying by hand with openssl (3.0+), given the envelope in `sig.json`:

    jq -r .payload sig.json | base64 -d > payload.json
    jq -r .signature sig.json | base64 -d > payload.sig
    jq -r .publicKeyPem sig.json > signer.pem          # or the PEM of a key you trust
    openssl pkeyutl -verify -pubin -inkey signer.pem -rawin -in payload.json -sigfile payload.sig
    jq -r '.critical.image."docker-manifest-digest"' payload.json   # must be the manifest's digest

`berth key --pem` prints a signer's key in that form. For an `ssh-ed25519 …` line from elsewhere
(older ssh-keygen cannot export ed25519 keys as PEM), Python's `cryptography` converts it:

    python3 -c 'import sys; from cryptography.hazmat.primitives import serialization as s;
    print(s.load_ssh_public_key(sys.stdin.buffer.read()).public_bytes(s.Encoding.PEM,
    s.PublicFormat.SubjectPublicKeyInfo).decode(), end="")' < id_ed25519.pub > signer.pem
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from berth.registry import bounded_json
from berth.registry.digest import Digest
from berth.registry.errors import BerthError, InvalidInput
from berth.registry.blob_upload import upload_bytes
from berth.registry.manifest import MANIFEST_TYPES, OCI_MANIFEST
from berth.registry.oci import RegistryClient, RegistryNotFound, Repository, read_bounded
from berth.registry.user_key import UserKey

SIGNATURE_TYPE = "application/vnd.berth.signature.v1+json"
PAYLOAD_TYPE = "berth signature"
EMPTY_CONFIG_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# Signatures, their envelopes and referrer lists are small; a registry sending more is refused.
MAX_SIGNATURE_BYTES = 64 * 1024
MAX_SIGNATURES = 16


class SignatureError(BerthError):
    """A signature could not be made, found or trusted."""


def payload_for(digest: Digest) -> bytes:
    doc = {"critical": {"image": {"docker-manifest-digest": str(digest)}, "type": PAYLOAD_TYPE}}
    return json.dumps(doc, separators=(",", ":")).encode()


def signature_tag(digest: Digest) -> str:
    """cosign's tag for a manifest's signatures: `sha256-<hex>.sig` (a tag may not contain `:`)."""
    return f"{digest.filename}.sig"


def envelope(key: UserKey, digest: Digest) -> bytes:
    payload = payload_for(digest)
    doc = {"payload": base64.b64encode(payload).decode(), "signature": base64.b64encode(key.sign(payload)).decode(),
           "publicKey": key.public_line(), "publicKeyPem": key.public_pem()}
    return json.dumps(doc, indent=2).encode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A trusted key as an `ssh-ed25519 AAAA…` line or a PEM public key."""
    data = text.strip().encode()
    try:
        key = (serialization.load_pem_public_key(data) if data.startswith(b"-----")
               else serialization.load_ssh_public_key(data))
    except (ValueError, binascii.Error, TypeError) as exc:
        raise InvalidInput(f"not an ed25519 public key ({exc}): {text[:40]!r}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInput(f"only ed25519 keys are supported: {text[:40]!r}")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """The `ssh-ed25519 AAAA…` line of a key: how keys are named in messages and policies."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def verify_envelope(raw: bytes, digest: Digest, trusted: list[Ed25519PublicKey]) -> str | None:
    """The id of the trusted key that signed `digest` in this envelope, or None."""
    try:
        doc = bounded_json.decode(raw)
        payload = base64.b64decode(doc["payload"], validate=True)
        signature = base64.b64decode(doc["signature"], validate=True)
        claims = bounded_json.decode(payload)
        signed = claims["critical"]["image"]["docker-manifest-digest"]
        kind = claims["critical"]["type"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    if signed != str(digest) or kind != PAYLOAD_TYPE:
        return None  # a valid signature of some other manifest proves nothing about this one
    for key in trusted:
        try:
            key.verify(signature, payload)
        except InvalidSignature:
            continue
        return key_id(key)
    return None


@dataclass(frozen=True)
class SignatureCheck:
    digest: Digest
    found: int  # signature envelopes the registry holds for this digest
    trusted_by: tuple[str, ...]  # ids of trusted keys with a valid signature

    @property
    def verified(self) -> bool:
        return bool(self.trusted_by)


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": str(Digest.of_bytes(data)), "size": len(data)}


class Signatures:
    """Pushes and fetches signature artifacts through a RegistryClient."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client

    def push(self, repo: Repository, subject_raw: bytes, subject_type: str, key: UserKey) -> Digest:
        """Sign the manifest `subject_raw` and store the signature; returns the signature manifest's digest."""

        subject = Digest.of_bytes(subject_raw)
        body = envelope(key, subject)
        for data in (EMPTY_CONFIG, body):
            upload_bytes(self.client, repo, data)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SIGNATURE_TYPE,
            "config": _descriptor(EMPTY_CONFIG_TYPE, EMPTY_CONFIG),
            "layers": [_descriptor(SIGNATURE_TYPE, body)],
            "subject": {"mediaType": subject_type, "digest": str(subject), "size": len(subject_raw)},
        }, separators=(",", ":")).encode()
        digest = Digest.of_bytes(manifest)
        scope = repo.scope("pull", "push")
        headers = {"Content-Type": OCI_MANIFEST}
        response = self.client.request("PUT", repo.manifest_url(str(digest)), repo, scope, headers=headers,
                                       content=manifest, ok=(200, 201, 202))
        response.close()
        if response.headers.get("oci-subject") != str(subject):
            # No referrers API here: the tag schema is how verifiers will find it, with the
            # signatures it already holds (another signer's push of the same model) kept.
            tagged = self._with_tagged(repo, subject, bounded_json.decode(manifest))
            response = self.client.request("PUT", repo.manifest_url(signature_tag(subject)), repo, scope,
                                           headers=headers, content=tagged, ok=(200, 201, 202))
            response.close()
        return digest

    def _with_tagged(self, repo: Repository, subject: Digest, doc: dict[str, Any]) -> bytes:
        """The signature manifest `doc` with the envelopes the `sha256-<hex>.sig` tag already holds
        (the newest MAX_SIGNATURES); another tool's signatures there are refused, not overwritten."""
        tag = signature_tag(subject)
        raw = self._small(repo, repo.manifest_url(tag), OCI_MANIFEST)
        layers: list[Any] = []
        if raw is not None:
            try:
                held = bounded_json.decode(raw)
                ours = (held.get("artifactType") == SIGNATURE_TYPE
                        and held.get("subject", {}).get("digest") == str(subject))
                layers = [layer for layer in held.get("layers", []) if layer.get("mediaType") == SIGNATURE_TYPE]
            except (ValueError, AttributeError):
                ours = False
            if not ours:
                raise SignatureError(f"{repo.host} has no referrers API, and its tag {tag} holds signatures of "
                                     "another kind (cosign's?); Berth will not overwrite them. Push the "
                                     "model to a registry with the OCI referrers API to sign it there")
        new = doc["layers"][0]
        layers = [layer for layer in layers if layer.get("digest") != new["digest"]] + [new]
        return json.dumps({**doc, "layers": layers[-MAX_SIGNATURES:]}, separators=(",", ":")).encode()

    def envelopes(self, repo: Repository, subject: Digest) -> list[bytes]:
        """Every signature envelope the registry holds for `subject` (referrers API, else the tag)."""
        manifests: list[bytes] = []
        for reference in self._referrers(repo, subject) or [signature_tag(subject)]:
            raw = self._small(repo, repo.manifest_url(reference), ", ".join((OCI_MANIFEST, *MANIFEST_TYPES)))
            if raw is not None:
                manifests.append(raw)
        found: list[bytes] = []
        for raw in manifests:
            try:
                doc = bounded_json.decode(raw)
                layers = [layer for layer in doc.get("layers", []) if layer.get("mediaType") == SIGNATURE_TYPE]
                if doc.get("subject", {}).get("digest") != str(subject):
                    continue
            except (ValueError, AttributeError):
                continue
            for layer in layers[:MAX_SIGNATURES]:
                try:
                    layer_digest = Digest.parse(str(layer.get("digest")))
                except BerthError:
                    continue
                data = self._small(repo, repo.blob_url(layer_digest), "*/*")
                if data is not None and Digest.of_bytes(data) == layer_digest:
                    found.append(data)
        return found

    def check(self, repo: Repository, subject: Digest, trusted: list[Ed25519PublicKey]) -> SignatureCheck:
        envelopes = self.envelopes(repo, subject)
        signers = {who for raw in envelopes if (who := verify_envelope(raw, subject, trusted)) is not None}
        return SignatureCheck(subject, len(envelopes), tuple(sorted(signers)))

    def _referrers(self, repo: Repository, subject: Digest) -> list[str]:
        url = f"{repo.base}/referrers/{subject}?artifactType={SIGNATURE_TYPE.replace('+', '%2B')}"
        raw = self._small(repo, url, OCI_INDEX)
        if raw is None:
            return []
        try:
            doc = bounded_json.decode(raw)
            if doc.get("mediaType", OCI_INDEX) != OCI_INDEX:
                return []
            refs = [m["digest"] for m in doc.get("manifests", []) if m.get("artifactType") == SIGNATURE_TYPE]
            return [str(Digest.parse(ref)) for ref in refs[:MAX_SIGNATURES]]
        except (ValueError, AttributeError, KeyError, TypeError, BerthError):
            return []

    def _small(self, repo: Repository, url: str, accept: str) -> bytes | None:
        """A bounded GET; None when the registry does not have it (or does not know the endpoint)."""
        try:
            response = self.client.request("GET", url, repo, repo.scope("pull"), headers={"Accept": accept})
        except RegistryNotFound:
            return None
        return read_bounded(response, MAX_SIGNATURE_BYTES, "signature data")
