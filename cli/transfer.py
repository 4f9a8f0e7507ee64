"""`berth pull`, `push`, `login`, `logout`: progress like Ollama's, one error line on failure.

Pull and push are requests to the server (`/api/pull`, `/api/push`), which does the transfer; this
module only draws its progress. On a terminal each layer gets a bar with size, speed and ETA; piped,
each status is printed once. Ctrl-C closes the stream, which cancels the server's side (a pull's
partial file stays, so running it again resumes). `login` checks the credentials against the
registry itself before saving them.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Iterator, TextIO

from berth.cli.client import Client, ClientError

if TYPE_CHECKING:
    from berth.registry.names import ModelName

# Transfers of big models take long; the server sends progress at least every few seconds.
READ_TIMEOUT = 600.0


def _events(path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for event in Client(timeout=READ_TIMEOUT).stream_json("POST", path, body):
        if "error" in event:
            raise ClientError(str(event["error"]))
        yield event


class PlainProgress:
    """One line per status, for logs and pipes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.seen: set[str] = set()

    def update(self, event: dict[str, Any]) -> None:
        # Layers are fetched at once, so their statuses interleave; each is printed the first time.
        status = event.get("status", "")
        if status not in self.seen:
            self.out.write(status + "\n")
            self.out.flush()
            self.seen.add(status)

    def close(self) -> None:
        pass


class BarProgress:
    """A rich progress bar per layer: size, speed and time left, as Ollama draws them."""

    def __init__(self) -> None:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
        self.progress.start()
        self.tasks: dict[str, Any] = {}

    def update(self, event: dict[str, Any]) -> None:
        status = event.get("status", "")
        key = event.get("digest") or status
        total = event.get("total")
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(status, total=total or None)
        self.progress.update(self.tasks[key], completed=event.get("completed", 0) if total else 0,
                             total=total or None, description=status)
        if not total:
            self.progress.update(self.tasks[key], total=1, completed=1)

    def close(self) -> None:
        self.progress.stop()


def _show(path: str, body: dict[str, Any], verb: str) -> None:
    display = BarProgress() if sys.stdout.isatty() else PlainProgress(sys.stdout)
    try:
        for event in _events(path, body):
            display.update(event)
    except KeyboardInterrupt:
        raise ClientError(f"{verb} interrupted; run it again to resume", exit_code=130) from None
    finally:
        display.close()


def pull(model: str, insecure: bool = False, max_rate: str | None = None) -> None:
    """`max_rate` like `50M` (bytes/s; registry/rate.py) caps this pull; the server checks it."""
    body: dict[str, Any] = {"model": model, "insecure": insecure, "stream": True}
    if max_rate:
        body["max_rate"] = max_rate
    _show("/api/pull", body, "pull")


def push(model: str, insecure: bool = False, oci: bool = False, sign: bool | None = None) -> None:
    """`sign`: the server signs the pushed manifest (registry/signing.py); None leaves it to the
    server's BERTH_SIGNING_KEY setting."""
    body: dict[str, object] = {"model": model, "insecure": insecure, "oci": oci, "stream": True}
    if sign is not None:
        body["sign"] = sign
    _show("/api/push", body, "push")


def public_key(pem: bool = False) -> str:
    """`berth key`: the user's public key line (created on first use), to register with a registry
    or put in someone's trust policy; with `pem`, as a PEM public key, which openssl reads."""
    from berth.registry.credentials import berth_home
    from berth.registry.errors import BerthError
    from berth.registry.user_key import load_or_create_key

    try:
        key = load_or_create_key(berth_home())
        return key.public_pem().rstrip("\n") if pem else key.public_line()
    except BerthError as exc:
        raise ClientError(str(exc)) from None


def verify(model: str, insecure: bool = False, keys: list[str] | None = None, remote: bool = False) -> str:
    """`berth verify MODEL`: check MODEL's signatures against BERTH_TRUST_POLICY's keys for its
    registry plus `keys` (`ssh-ed25519 …` lines or PEM files); raises unless one verifies.

    A model the server has is checked as stored: the signatures its registry holds must sign the
    local manifest's digest, or (for a Docker v2 manifest) the OCI manifest `push --oci` makes of
    it, which has the same config and layers; so a local copy that differs from what was signed
    fails. Otherwise, or with `remote`, the manifest the registry serves for the tag is checked."""
    from pathlib import Path

    from berth.registry.credentials import CredentialStore
    from berth.registry.digest import Digest
    from berth.registry.errors import BerthError
    from berth.registry.names import ModelName
    from berth.registry.network import NetworkSettings
    from berth.registry.oci import RegistryClient, Repository
    from berth.registry.pull import fetch_manifest
    from berth.registry.signing import Signatures, parse_public_key
    from berth.registry.trust import TrustPolicy

    try:
        name = ModelName.parse(model)
        repo = Repository.of(name, insecure)
        rule = TrustPolicy.from_env(os.environ).rule_for(repo.host, repo.path)
        extra = [parse_public_key(Path(k).read_text() if Path(k).is_file() else k) for k in keys or []]
        trusted = [*rule.keys, *extra]
        if not trusted:
            raise ClientError(f"no trusted keys for {repo.host}/{repo.path}: pass --key or set BERTH_TRUST_POLICY")
        local = [] if remote else _local_digests(name)
        with RegistryClient(CredentialStore(), network=NetworkSettings.from_env()) as client:
            for digest in local or [fetch_manifest(client, repo, name.tag).digest]:
                check = Signatures(client).check(repo, digest, trusted)
                if check.verified:
                    break
    except BerthError as exc:
        raise ClientError(f"verify {model}: {exc}") from None
    if local:
        as_pushed = f", pushed as the OCI manifest {digest}" if check.verified and digest != local[0] else ""
        what = f"{model} (local copy, {local[0]}{as_pushed})"
    else:
        what = f"{model} ({digest} in {repo.host})"
    if not check.verified:
        found = f"{check.found} signature(s), none by a trusted key" if check.found else "no signature"
        raise ClientError(f"{what} is NOT verified: {found}")
    return f"{what} verified: signed by " + ", ".join(check.trusted_by)


def _local_digests(name: "ModelName") -> list["Digest"]:
    """The digests the server's copy of `name` may be signed under: its manifest's and, for a Docker
    v2 manifest, the digest of the OCI manifest `berth push --oci` sends for it. Empty when the
    server has no such model (or none is running)."""
    from berth.registry.digest import Digest
    from berth.registry.errors import BerthError
    from berth.registry.manifest import DOCKER_MANIFEST, Manifest
    from berth.registry.push import oci_manifest

    found = _local_digest(name)
    if found is None:
        return []
    digests = [Digest.parse(f"sha256:{found}")]
    try:
        # The server's own registry API serves the stored manifest bytes by digest.
        raw = Client(timeout=10).request("GET", f"/v2/{name.namespace}/{name.model}/manifests/{digests[0]}").content
        manifest = Manifest.parse(raw)
    except (ClientError, BerthError):
        return digests
    if manifest.media_type == DOCKER_MANIFEST and manifest.digest == digests[0]:
        digests.append(Digest.of_bytes(oci_manifest(manifest)))
    return digests


def _local_digest(name: "ModelName") -> str | None:
    """The manifest digest (hex) of `name` on the server, or None when it has no such model or no
    server is running (then only the registry can be asked)."""
    from berth.registry.errors import BerthError
    from berth.registry.names import ModelName

    try:
        models = Client(timeout=10).get_json("/api/tags").get("models", [])
    except ClientError:
        return None
    for entry in models:
        try:
            if ModelName.parse(entry.get("model") or entry.get("name", "")).key == name.key:
                return str(entry.get("digest")) or None
        except BerthError:
            continue
    return None


def login(registry: str, username: str | None, password_stdin: bool, insecure: bool = False) -> str:
    """Check the credentials against the registry, then store them; returns the message to print."""
    import typer

    from berth.registry.credentials import Credential, CredentialStore, normalize_host
    from berth.registry.errors import BerthError
    from berth.registry.network import NetworkSettings
    from berth.registry.oci import RegistryClient, Repository

    try:
        host = normalize_host(registry)
    except BerthError as exc:
        raise ClientError(str(exc)) from None
    user = username or typer.prompt("Username")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True)
    if not password:
        raise ClientError("a password is required (pass it on stdin with --password-stdin)")
    credential = Credential(user, password)

    class _Trial:
        def get(self, _registry: str) -> Credential:
            return credential

    try:
        with RegistryClient(_Trial(), network=NetworkSettings.from_env()) as client:
            client.ping(Repository(host, "", insecure))
        CredentialStore().save(host, credential)
    except BerthError as exc:
        raise ClientError(f"login to {host} failed: {exc}") from None
    return "Login Succeeded"


def logout(registry: str) -> str:
    from berth.registry.credentials import CredentialStore
    from berth.registry.errors import BerthError

    try:
        removed = CredentialStore().remove(registry)
    except BerthError as exc:
        raise ClientError(str(exc)) from None
    if not removed:
        raise ClientError(f"not logged in to {registry}")
    return f"Removed login credentials for {registry}"
