"""Pushing a model to an OCI registry: blobs (HEAD, mount, or chunked upload), then the manifest.

Statuses follow Ollama (docs/ollama-compatibility.md, "Push"): `retrieving manifest`, `pushing <12hex>` per
blob, `pushing manifest`, `success`. Each blob is first asked for with HEAD, so pushing an
unchanged model again sends no blob bytes. A layer with a `from` naming a model on the same
registry is offered as a cross-repository mount first. Otherwise the blob goes up in chunks
(POST, PATCH with `Content-Range`, PUT `?digest=`); when a PATCH fails the upload URL is asked how
much it holds (its `Range`) and the upload continues from there instead of starting over.

The manifest goes up as its stored bytes with its own media type, so the remote digest equals the
local one. With `oci=True` an OCI image manifest with the same config and layers is pushed instead
(the config descriptor typed as an OCI image config, which OCI tools such as skopeo require); its
bytes, and so its digest, differ from the local manifest's.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from berth.registry.digest import Digest
from berth.registry.errors import BerthError, InvalidInput
from berth.registry.library import Library
from berth.registry.manifest import OCI_MANIFEST, Descriptor, Manifest
from berth.registry.names import ModelName
from berth.registry.oci import (RegistryClient, RegistryError, RegistryRefused, RegistryUnauthorized, Repository,
                          read_bounded)
from berth.registry.blob_upload import upload_location, with_query
from berth.registry.pull import Emit, progress
from berth.registry.signing import Signatures
from berth.registry.user_key import UserKey

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DEFAULT_UPLOAD_CHUNK = 32 * 1024 * 1024
PROGRESS_INTERVAL = 0.1


class PushCancelled(BerthError):
    """The client went away; the registry keeps (or expires) the unfinished upload."""


def oci_manifest(manifest: Manifest) -> bytes:
    """The same config and layers as an OCI image manifest (compact JSON)."""
    def descriptor(desc: Descriptor, media_type: str | None = None) -> dict[str, Any]:
        return {"mediaType": media_type or desc.media_type, "digest": str(desc.digest), "size": desc.size}

    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(manifest.config, OCI_CONFIG),
           "layers": [descriptor(layer) for layer in manifest.layers]}
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class PushResult:
    manifest_digest: Digest
    uploaded_bytes: int
    mounted: int


def parse_range_end(value: str | None) -> int:
    """Bytes a registry holds for an upload, from its `Range: 0-<last>` answer."""
    if not value:
        return 0
    _, _, last = value.strip().removeprefix("bytes=").partition("-")
    # distribution answers `0-0` for an empty upload as well as for a 1-byte one; chunks are
    # never 1 byte, so 0-0 means empty.
    return int(last) + 1 if last.isdigit() and int(last) > 0 else 0


class Pusher:
    """Pushes models from a Library. Thread-safe; one per app."""

    def __init__(self, library: Library, client: RegistryClient, chunk_size: int = DEFAULT_UPLOAD_CHUNK) -> None:
        self.library = library
        self.client = client
        self.chunk_size = chunk_size

    def push(self, name: ModelName, emit: Emit, insecure: bool = False, oci: bool = False,
             cancel: threading.Event | None = None, sign: UserKey | None = None) -> PushResult:
        """Push `name`; with `sign`, also store a signature of the pushed manifest (registry/signing.py)."""
        cancel = cancel or threading.Event()
        emit(progress("retrieving manifest"))
        stored = self.library.get(name)
        manifest = stored.manifest
        repo = Repository.of(stored.name, insecure)
        uploaded = mounted = 0
        with self.library.pinned([desc.digest for desc in manifest.blobs()]):
            for desc in manifest.blobs():
                sent, was_mounted = self._push_blob(repo, desc, emit, cancel)
                uploaded += sent
                mounted += int(was_mounted)
        emit(progress("pushing manifest"))
        raw, media_type = (oci_manifest(manifest), OCI_MANIFEST) if oci else (manifest.raw, manifest.media_type)
        response = self.client.request("PUT", repo.manifest_url(stored.name.tag), repo, repo.scope("pull", "push"),
                                       headers={"Content-Type": media_type}, content=raw, ok=(200, 201, 202))
        response.close()
        if sign is not None:
            emit(progress("pushing signature"))
            Signatures(self.client).push(repo, raw, media_type, sign)
        emit(progress("success"))
        return PushResult(Digest.of_bytes(raw), uploaded, mounted)

    # -- one blob --------------------------------------------------------------------------------

    def _push_blob(self, repo: Repository, desc: Descriptor, emit: Emit, cancel: threading.Event) -> tuple[int, bool]:
        status = f"pushing {desc.digest.short}"
        scope = repo.scope("pull", "push")
        head = self.client.request("HEAD", repo.blob_url(desc.digest), repo, scope, ok=(200, 404))
        head.close()
        if head.status_code == 200:
            emit(progress(status, desc.digest, desc.size, desc.size))
            return 0, False
        location, mounted = self._start_upload(repo, desc)
        if mounted:
            emit(progress(status, desc.digest, desc.size, desc.size))
            return 0, True
        sent = self._upload(repo, desc, location, emit, status, cancel)
        emit(progress(status, desc.digest, desc.size, desc.size))
        return sent, False

    def _mount_source(self, repo: Repository, desc: Descriptor) -> str | None:
        """The repository a `from` names on this same registry, if any (mounts never cross hosts)."""
        if not desc.from_:
            return None
        try:
            source = ModelName.parse(desc.from_)
        except InvalidInput:
            return None  # Ollama also writes file paths here
        if source.host.lower() != repo.host or source.repository == repo.path:
            return None
        return source.repository

    def _start_upload(self, repo: Repository, desc: Descriptor) -> tuple[str, bool]:
        source = self._mount_source(repo, desc)
        if source is not None:
            scope = f"{repo.scope('pull', 'push')} repository:{source}:pull"
            response = self.client.request("POST", repo.uploads_url(mount=str(desc.digest), **{"from": source}),
                                           repo, scope, ok=(201, 202))
            response.close()
            if response.status_code == 201:
                return "", True
            return upload_location(repo, response.headers), False
        response = self.client.request("POST", repo.uploads_url(), repo, repo.scope("pull", "push"), ok=(202,))
        response.close()
        return upload_location(repo, response.headers), False

    def _upload(self, repo: Repository, desc: Descriptor, location: str, emit: Emit, status: str,
                cancel: threading.Event) -> int:
        scope = repo.scope("pull", "push")
        path = self.library.blobs.path(desc.digest)
        offset = sent = failures = 0
        last_emit = 0.0
        fd = os.open(path, os.O_RDONLY)
        try:
            while offset < desc.size:
                if cancel.is_set():
                    raise PushCancelled("push cancelled; run it again to resume")
                length = min(self.chunk_size, desc.size - offset)
                data = os.pread(fd, length, offset)
                if len(data) != length:
                    raise BerthError(f"blob {desc.digest} is shorter than its manifest says; run `berth fsck`")
                try:
                    response = self.client.request(
                        "PATCH", location, repo, scope, content=data, retry=False, ok=(202,),
                        headers={"Content-Type": "application/octet-stream",
                                 "Content-Range": f"{offset}-{offset + length - 1}"})
                    response.close()
                    location = upload_location(repo, response.headers)
                    offset += length
                    sent += length
                    failures = 0
                except (RegistryUnauthorized, RegistryRefused):
                    raise
                except RegistryError as exc:
                    failures += 1
                    if failures >= self.client.retry.attempts:
                        raise RegistryError(f"uploading {desc.digest} to {repo.host} failed at byte {offset}: "
                                            f"{exc}; run the push again") from None
                    time.sleep(self.client.retry.backoff(failures - 1))
                    offset, location = self._upload_status(repo, scope, location)
                now = time.monotonic()
                if now - last_emit >= PROGRESS_INTERVAL:
                    emit(progress(status, desc.digest, desc.size, offset))
                    last_emit = now
        finally:
            os.close(fd)
        commit = self.client.request("PUT", with_query(location, "digest", str(desc.digest)), repo, scope,
                                     headers={"Content-Length": "0"}, content=b"", ok=(201, 204))
        commit.close()
        return sent

    def _upload_status(self, repo: Repository, scope: str, location: str) -> tuple[int, str]:
        """Ask the upload URL how many bytes it holds: the offset to resume from."""
        response = self.client.request("GET", location, repo, scope, ok=(204, 200))
        headers = response.headers
        read_bounded(response, 64 * 1024, "upload status")
        return parse_range_end(headers.get("range")), upload_location(repo, headers) if (
            headers.get("location") or headers.get("docker-upload-location")) else location
