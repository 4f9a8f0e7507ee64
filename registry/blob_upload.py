"""The small pieces of the OCI blob upload protocol that a push and a signature share: where an
upload goes next, and a blob held in memory sent in one PUT (distribution-spec, "Pushing blobs")."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from berth.registry.digest import Digest
from berth.registry.oci import RegistryClient, RegistryError, Repository


def upload_location(repo: Repository, headers: Any) -> str:
    location = headers.get("docker-upload-location") or headers.get("location")
    if not location:
        raise RegistryError(f"{repo.host} started an upload but gave no Location to send it to")
    return repo.absolute(location)


def with_query(url: str, key: str, value: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{key}={quote(value, safe=':')}"


def upload_bytes(client: RegistryClient, repo: Repository, data: bytes) -> Digest:
    """Upload a small blob held in memory (HEAD first, then POST + one PUT): signature artifacts."""
    digest = Digest.of_bytes(data)
    scope = repo.scope("pull", "push")
    head = client.request("HEAD", repo.blob_url(digest), repo, scope, ok=(200, 404))
    head.close()
    if head.status_code == 200:
        return digest
    started = client.request("POST", repo.uploads_url(), repo, scope, ok=(202,))
    started.close()
    location = with_query(upload_location(repo, started.headers), "digest", str(digest))
    done = client.request("PUT", location, repo, scope, content=data, ok=(201, 204),
                          headers={"Content-Type": "application/octet-stream"})
    done.close()
    return digest
