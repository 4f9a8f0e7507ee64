"""Pull: a real registry for the happy paths, and a small hostile registry of our own for the rest.

The hostile registry is a real HTTP server on 127.0.0.1 (http.server on a thread) that misbehaves
in one chosen way per test: bad digests, oversized or gzip-bomb bodies, wrong or truncated bytes,
stalls, dropped connections, redirects to another host, foreign token realms.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import json
import os
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest

from berth.registry.catalog.downloads import DownloadJournal
from berth.registry.credentials import Credential, CredentialStore
from berth.registry.digest import Digest
from berth.registry.errors import BerthError, InvalidDigest, InvalidInput, TooLarge
from berth.registry.library import Library
from berth.registry.manifest import DOCKER_CONFIG, DOCKER_MANIFEST, MODEL_LAYER, Descriptor
from berth.registry.names import ModelName
from berth.registry.network import NetworkSettings
from berth.registry.oci import (RegistryClient, RegistryError, RegistryNotFound, RegistryRefused, Repository, RetryPolicy,
                          Timeouts)
from berth.registry.pull import (BlobDigestMismatch, BlobFetch, PullCancelled, Puller, PullResult, SharedDownloads,
                           partial_path)
from berth.registry.push import Pusher
from berth.registry.rate import RateLimiter, parse_rate
from tests.fake_http import LoopbackServer, QuietHandler
from tests.registry_fixture import PROXIED_HOST, LocalRegistry, make_model, self_signed_certificate

MiB = 1024 * 1024
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)
BOMB = gzip.compress(bytes(64 * MiB))


# -- the hostile registry ---------------------------------------------------------------------------

@dataclass
class Behaviour:
    manifest: bytes = b""
    blobs: dict[str, bytes] = field(default_factory=dict)
    wrong_bytes: bool = False            # serve other bytes than the digest names
    stop_at: int | None = None           # never serve past this absolute offset (truncate / hang)
    hang: bool = False                   # at stop_at, stall instead of closing
    drop_every: int | None = None        # close the connection after this many body bytes
    cut_first: int = 0                   # close this many blob bodies halfway, then serve whole
    gzip_bomb: bool = False              # body is a gzip bomb with Content-Encoding: gzip
    manifest_plain: bool = False         # ... but the manifest is served normally
    redirect_to: str | None = None       # 307 blob GETs to this base URL (+ /storage/<digest>)
    require_basic: bool = False          # 401 Basic without credentials
    bearer_realm: str | None = None      # 401 Bearer with this realm
    throttle_first: int = 0              # answer this many requests with 429 Retry-After: 1
    connection_rate: int | None = None   # send each blob body at this many bytes/s (a throttled CDN)
    link_rate: int | None = None         # send all blob bodies together at this many bytes/s (a slow link)
    no_ranges: bool = False              # ignore Range: every blob GET gets the whole blob, 200
    token_bomb: bool = False             # the token endpoint answers with a gzip bomb
    bodies_at_once: int = 0              # most blob bodies being sent at the same time, so far
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


class HostileRegistry:
    def __init__(self) -> None:
        self.behaviour = Behaviour()
        behaviour_of = lambda: self.behaviour  # noqa: E731
        sending_lock = threading.Lock()
        sending: list[object] = []  # the handlers sending a blob body now
        link = threading.Lock()  # held while a piece crosses the slow link

        class Handler(QuietHandler):
            def do_HEAD(self) -> None:
                self._handle(head=True)

            def do_GET(self) -> None:
                self._handle(head=False)

            def _handle(self, head: bool) -> None:
                b = behaviour_of()
                b.requests.append((self.command, self.path, dict(self.headers)))
                if b.throttle_first > 0:
                    b.throttle_first -= 1
                    return self._send(429, b"slow down", {"Retry-After": "1"})
                if self.path.startswith("/token"):
                    if b.token_bomb:
                        return self._send(200, BOMB, {"Content-Encoding": "gzip", "Content-Type": "application/json"})
                    return self._send(200, b'{"token":"stolen"}')
                if self.path.startswith("/storage/"):
                    return self._blob(self.path.rsplit("/", 1)[1], head)
                if b.bearer_realm and not self.headers.get("Authorization"):
                    return self._send(401, b"", {"WWW-Authenticate": f'Bearer realm="{b.bearer_realm}",'
                                                 'service="x",scope="repository:library/m:pull"'})
                if b.require_basic and not (self.headers.get("Authorization") or "").startswith("Basic "):
                    return self._send(401, b"", {"WWW-Authenticate": 'Basic realm="hostile"'})
                if "/manifests/" in self.path:
                    body = b.manifest
                    if not body:
                        return self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}')
                    if b.gzip_bomb and not b.manifest_plain:
                        return self._send(200, gzip.compress(b" " * (64 * MiB)),
                                          {"Content-Encoding": "gzip", "Content-Type": DOCKER_MANIFEST})
                    return self._send(200, body, {"Content-Type": DOCKER_MANIFEST})
                if "/blobs/" in self.path:
                    digest = self.path.rsplit("/", 1)[1]
                    if b.redirect_to:
                        return self._send(307, b"", {"Location": f"{b.redirect_to}/storage/{digest}"})
                    return self._blob(digest, head)
                self._send(404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"nope"}]}')

            def _blob(self, digest: str, head: bool) -> None:
                b = behaviour_of()
                data = b.blobs.get(digest)
                if data is None:
                    return self._send(404)
                if b.wrong_bytes:
                    data = bytes(len(data))
                extra = {}
                if b.gzip_bomb:
                    # Concatenated gzip members, each inflating 64 MiB of zeros: ~2 GiB if decoded.
                    data = (BOMB * (len(data) // len(BOMB) + 1))[:len(data)]
                    extra = {"Content-Encoding": "gzip"}
                start, end = 0, len(data) - 1
                status = 200
                ranged = self.headers.get("Range")
                if ranged and not b.no_ranges:
                    first, _, last = ranged.removeprefix("bytes=").partition("-")
                    start, end = int(first), min(int(last or end), end)
                    status = 206
                self.send_response(status)
                for key, value in extra.items():
                    self.send_header(key, value)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                if head:
                    return
                limit = end + 1
                if b.stop_at is not None:
                    limit = min(limit, b.stop_at)
                if b.drop_every is not None:
                    limit = min(limit, start + b.drop_every)
                if b.cut_first > 0:
                    b.cut_first -= 1
                    limit = min(limit, start + (end + 1 - start) // 2)
                try:
                    if limit > start:
                        self._write_body(b, data[start:limit])
                    if limit <= end:
                        if b.hang:
                            time.sleep(3)
                        self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def _write_body(self, b: Behaviour, body: bytes) -> None:
                with sending_lock:
                    sending.append(self)
                    b.bodies_at_once = max(b.bodies_at_once, len(sending))
                try:
                    step = len(body) if b.connection_rate is None and b.link_rate is None else 64 * 1024
                    for offset in range(0, len(body), step):
                        piece = body[offset:offset + step]
                        if b.connection_rate is not None:
                            time.sleep(len(piece) / b.connection_rate)  # paced before, so none lingers after
                        if b.link_rate is not None:
                            with link:
                                time.sleep(len(piece) / b.link_rate)
                        self.wfile.write(piece)
                        self.wfile.flush()
                finally:
                    with sending_lock:
                        sending.remove(self)

        self.http = LoopbackServer(Handler)
        self.port, self.host = self.http.port, self.http.host

    def serve_model(self, weights: bytes, *, digest_override: str | None = None) -> str:
        """Publish a model whose manifest names `weights`; returns the weights digest."""
        config = b'{"model_format":"gguf","model_family":"test"}'
        wd, cd = hashlib.sha256(weights).hexdigest(), hashlib.sha256(config).hexdigest()
        self.behaviour.blobs = {f"sha256:{wd}": weights, f"sha256:{cd}": config}
        self.behaviour.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": f"sha256:{cd}", "size": len(config)},
            "layers": [{"mediaType": MODEL_LAYER, "digest": f"sha256:{wd}" if digest_override is None else digest_override,
                        "size": len(weights)}]}).encode()
        return f"sha256:{wd}"

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def hostile() -> Iterator[HostileRegistry]:
    server = HostileRegistry()
    yield server
    server.close()


def make_puller(library: Library, tmp_path: Path, *, read_timeout: float = 5.0, chunk: int = MiB,
                credentials: dict[str, Credential] | None = None) -> Puller:
    store = CredentialStore(tmp_path / "creds.json", tmp_path / "docker.json")
    for host, cred in (credentials or {}).items():
        store.save(host, cred)
    client = RegistryClient(store, Timeouts(connect=2, read=read_timeout), FAST_RETRY)
    return Puller(library, client, chunk_size=chunk, parallel=4)


def _name(server: HostileRegistry | LocalRegistry) -> ModelName:
    return ModelName.parse(f"{server.host}/library/m:latest")


def _pull(puller: Puller, name: ModelName) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    puller.pull(name, events.append, insecure=True)
    return events


def _nothing_committed(library: Library, tmp_path: Path, before: set[str]) -> None:
    assert library.names() == []
    assert {p.name for p in tmp_path.iterdir()} == before  # no file outside the models dir


# -- real registry ---------------------------------------------------------------------------------

def test_cancelled_pull_resumes_in_a_new_process_from_the_journal(hostile: HostileRegistry, tmp_path: Path) -> None:
    weights = os.urandom(6 * MiB)
    digest = Digest.parse(hostile.serve_model(weights))
    hostile.behaviour.stop_at = 3 * MiB + 17
    hostile.behaviour.hang = True
    library = Library(tmp_path / "models")
    puller = make_puller(library, tmp_path)
    cancel = threading.Event()

    def stop_when_stalled(event: dict[str, Any]) -> None:
        if event.get("digest") == str(digest) and event.get("completed", 0) >= 3 * MiB:
            cancel.set()

    with pytest.raises(PullCancelled):
        puller.pull(_name(hostile), stop_when_stalled, insecure=True, cancel=cancel)
    assert partial_path(library.blobs, digest).exists() and library.names() == []
    deadline = time.monotonic() + 15
    while puller.downloads.active() and time.monotonic() < deadline:
        time.sleep(0.05)
    library.close()

    # A new Library on the same directory stands for a restarted server.
    hostile.behaviour.stop_at = None
    hostile.behaviour.hang = False
    library = Library(tmp_path / "models")
    resumed = make_puller(library, tmp_path)
    state = resumed.journal.load(digest)
    assert state is not None
    kept = sum(c.completed for c in state.chunks.values())
    assert kept >= 3 * MiB
    result = resumed.pull(_name(hostile), lambda e: None, insecure=True)
    assert result.fetched_bytes <= len(weights) - kept + 1024  # + the tiny config blob
    assert library.blobs.path(digest).read_bytes() == weights
    assert resumed.journal.load(digest) is None and not partial_path(library.blobs, digest).exists()
    library.close()


def test_concurrent_pulls_share_one_download(registry: LocalRegistry, tmp_path: Path) -> None:
    source = Library(tmp_path / "source")
    name = f"{registry.host}/library/m:latest"
    make_model(source, name, os.urandom(8 * MiB))
    Pusher(source, make_puller(source, tmp_path).client).push(ModelName.parse(name), lambda e: None, insecure=True)
    source.close()

    class CountingDownloads(SharedDownloads):
        started = 0

        def join(self, digest, make, cancel=None):  # type: ignore[no-untyped-def]
            def counted():  # type: ignore[no-untyped-def]
                CountingDownloads.started += 1
                return make()
            return super().join(digest, counted, cancel)

    library = Library(tmp_path / "models")
    puller = make_puller(library, tmp_path)
    puller.downloads = CountingDownloads()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            puller.pull(ModelName.parse(name), lambda e: time.sleep(0.001), insecure=True)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    # 3 blobs (weights, template, config): shared, so at most one download each.
    assert CountingDownloads.started == 3
    library.close()


# -- hostile registry ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["sha256:../../../../etc/passwd", "sha256:" + "A" * 64, "sha256:", "", "md5:abc"])
def test_bad_digests_are_refused_before_use(hostile: HostileRegistry, library: Library, tmp_path: Path,
                                            bad: str) -> None:
    hostile.serve_model(b"weights", digest_override=bad)
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(InvalidDigest):
        _pull(make_puller(library, tmp_path), _name(hostile))
    _nothing_committed(library, tmp_path, before)
    assert not [r for r in hostile.behaviour.requests if "/blobs/" in r[1]]


def test_oversized_manifest_is_refused(hostile: HostileRegistry, library: Library, tmp_path: Path) -> None:
    hostile.serve_model(b"w")
    hostile.behaviour.manifest = b"{" + b" " * (5 * MiB) + b"}"
    with pytest.raises(TooLarge):
        _pull(make_puller(library, tmp_path), _name(hostile))


def test_gzip_bomb_manifest_is_bounded(hostile: HostileRegistry, library: Library, tmp_path: Path) -> None:
    hostile.serve_model(b"w")
    hostile.behaviour.gzip_bomb = True
    with pytest.raises(TooLarge):
        _pull(make_puller(library, tmp_path), _name(hostile))


def test_gzip_bomb_blob_is_raw_bytes_that_fail_the_digest(hostile: HostileRegistry, library: Library,
                                                         tmp_path: Path) -> None:
    digest = Digest.parse(hostile.serve_model(os.urandom(2 * MiB)))
    hostile.behaviour.gzip_bomb = True
    puller = make_puller(library, tmp_path)
    # Manifests get a bounded decode (the test above); blobs are never decoded at all.
    hostile.behaviour.manifest_plain = True
    with pytest.raises(BlobDigestMismatch):
        _pull(puller, _name(hostile))
    assert not library.blobs.exists(digest) and not partial_path(library.blobs, digest).exists()


def _repo(server: HostileRegistry):  # type: ignore[no-untyped-def]
    from berth.registry.oci import Repository

    return Repository(server.host, "library/m", insecure=True)


def test_wrong_bytes_discard_the_download(hostile: HostileRegistry, library: Library, tmp_path: Path) -> None:
    digest = Digest.parse(hostile.serve_model(os.urandom(3 * MiB)))
    hostile.behaviour.wrong_bytes = True
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(BlobDigestMismatch, match="digest mismatch, file must be downloaded again"):
        _pull(make_puller(library, tmp_path), _name(hostile))
    assert not library.blobs.exists(digest) and not partial_path(library.blobs, digest).exists()
    _nothing_committed(library, tmp_path, before)


def _blob_gets(hostile: HostileRegistry, digest: Digest) -> list[dict[str, str]]:
    return [headers for method, path, headers in hostile.behaviour.requests
            if method == "GET" and path.endswith(f"/blobs/{digest}")]


def _leftovers(library: Library, puller: Puller) -> list[str]:
    """Files in the blob store that are not blobs (partial or temporary files), once the downloads a
    failed pull left (the other blobs, being cancelled) have stopped."""
    deadline = time.monotonic() + 10
    while puller.downloads.active() and time.monotonic() < deadline:
        time.sleep(0.02)
    return [p.name for p in library.blobs.blobs_dir.iterdir() if Digest.from_filename(p.name) is None]


def test_a_small_blob_is_fetched_whole_and_leaves_no_resume_records(hostile: HostileRegistry, library: Library,
                                                                    tmp_path: Path) -> None:
    weights = os.urandom(300_000)
    digest = Digest.parse(hostile.serve_model(weights))
    _pull(puller := make_puller(library, tmp_path), _name(hostile))
    assert library.blobs.path(digest).read_bytes() == weights
    gets = _blob_gets(hostile, digest)
    assert len(gets) == 1 and "Range" not in gets[0]  # one request, not ranged chunks
    assert DownloadJournal(library).load(digest) is None and _leftovers(library, puller) == []


def test_a_small_blob_cut_short_is_fetched_again_whole(hostile: HostileRegistry, library: Library,
                                                       tmp_path: Path) -> None:
    weights = os.urandom(300_000)
    digest = Digest.parse(hostile.serve_model(weights))
    hostile.behaviour.cut_first = 2  # the config and the weights, each cut once
    _pull(puller := make_puller(library, tmp_path), _name(hostile))
    assert library.blobs.path(digest).read_bytes() == weights
    assert len(_blob_gets(hostile, digest)) == 2 and _leftovers(library, puller) == []


def test_a_small_blob_cut_short_every_time_fails_with_what_happened(hostile: HostileRegistry, library: Library,
                                                                    tmp_path: Path) -> None:
    digest = Digest.parse(hostile.serve_model(os.urandom(300_000)))
    hostile.behaviour.stop_at = 1000
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(RegistryError, match=r"failed 3 times .*run the pull again"):
        _pull(puller := make_puller(library, tmp_path), _name(hostile))
    assert len(_blob_gets(hostile, digest)) == 3  # FAST_RETRY's attempts
    assert not library.blobs.exists(digest) and _leftovers(library, puller) == []
    _nothing_committed(library, tmp_path, before)


def test_a_small_blob_with_wrong_bytes_is_discarded(hostile: HostileRegistry, library: Library,
                                                    tmp_path: Path) -> None:
    digest = Digest.parse(hostile.serve_model(os.urandom(300_000)))
    hostile.behaviour.wrong_bytes = True
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(BlobDigestMismatch, match=f"want {digest}.*nothing was tagged"):
        _pull(puller := make_puller(library, tmp_path), _name(hostile))
    assert not library.blobs.exists(digest) and _leftovers(library, puller) == []
    _nothing_committed(library, tmp_path, before)


def test_a_small_blob_longer_than_its_manifest_says_is_refused(hostile: HostileRegistry, library: Library,
                                                               tmp_path: Path) -> None:
    weights = os.urandom(300_000)
    digest = Digest.parse(hostile.serve_model(weights))
    hostile.behaviour.manifest = hostile.behaviour.manifest.replace(b'"size": 300000', b'"size": 1000')
    with pytest.raises(TooLarge):
        _pull(puller := make_puller(library, tmp_path), _name(hostile))
    assert not library.blobs.exists(digest) and _leftovers(library, puller) == []
    assert library.names() == []


def test_a_lone_stream_asks_for_the_rest_once_its_throughput_is_known(
        hostile: HostileRegistry, library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first request asks for RUN_CHUNKS chunks; once the rate is known (here far more than the
    rest moves in a ramp step), the second asks for everything left: two requests, not three."""
    from berth.registry import pull as pulling

    monkeypatch.setattr(pulling, "RAMP_INTERVAL", 5.0)  # no second stream; any rate > 0.4 MiB/s
    weights = os.urandom(3 * MiB)
    digest = Digest.parse(hostile.serve_model(weights))
    _pull(make_puller(library, tmp_path, chunk=128 * 1024), _name(hostile))
    assert library.blobs.path(digest).read_bytes() == weights
    first = pulling.RUN_CHUNKS * 128 * 1024
    assert [g.get("Range") for g in _blob_gets(hostile, digest)] == [
        f"bytes=0-{first - 1}", f"bytes={first}-{3 * MiB - 1}"]


def test_a_resumed_run_stops_before_a_later_chunk_that_is_partly_on_disk(
        hostile: HostileRegistry, library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks 0-1 missing, chunk 2 half on disk (recorded durable, not yet checked), 3-5 missing: the
    first request stops before chunk 2, and chunk 2 is fetched from its first missing byte, so
    nothing on disk comes over the network again."""
    from berth.registry import pull as pulling

    monkeypatch.setattr(pulling, "RAMP_INTERVAL", 5.0)  # one stream: the requests come in order
    weights = os.urandom(6 * MiB)
    digest = Digest.parse(hostile.serve_model(weights))
    half = 2 * MiB + MiB // 2
    partial_path(library.blobs, digest).write_bytes(bytes(2 * MiB) + weights[2 * MiB:half] + bytes(6 * MiB - half))
    journal = DownloadJournal(library)
    journal.start(digest, len(weights), MiB)
    journal.record(digest, {2: (MiB // 2, None)})
    result = make_puller(library, tmp_path).pull(_name(hostile), lambda e: None, insecure=True)
    assert library.blobs.path(digest).read_bytes() == weights
    assert [g.get("Range") for g in _blob_gets(hostile, digest)] == [
        f"bytes=0-{2 * MiB - 1}", f"bytes={half}-{6 * MiB - 1}"]
    config = sum(d.size for d in result.manifest.blobs() if d.digest != digest)
    assert result.fetched_bytes == config + len(weights) - MiB // 2


def _fetch_of(library: Library, tmp_path: Path, size: int, chunk: int) -> BlobFetch:
    """A BlobFetch of a blob nobody serves, for checking its bookkeeping alone."""
    puller = make_puller(library, tmp_path, chunk=chunk)
    desc = Descriptor(MODEL_LAYER, Digest.of_bytes(b"x"), size)
    return BlobFetch(puller.client, Repository.of(ModelName.parse("127.0.0.1:9/library/m:latest")), desc,
                     library.blobs, puller.journal, chunk_size=chunk)


def test_run_length_needs_a_run_of_bytes_before_it_trusts_the_throughput(library: Library, tmp_path: Path) -> None:
    """A resume's first run can be one small piece, landed microseconds after its first byte: read
    as a rate, that would let one stream claim the whole rest and keep the ramp from adding any."""
    from berth.registry import pull as pulling

    fetch = _fetch_of(library, tmp_path, size=64 * MiB, chunk=MiB)
    plan = pulling.ChunkPlan(64 * MiB, MiB)
    fetch._first_byte, fetch.fetched = time.monotonic() - 0.0002, 100_000  # noqa: SLF001
    assert fetch._run_chunks(plan) == pulling.RUN_CHUNKS  # noqa: SLF001
    fetch._first_byte, fetch.fetched = time.monotonic() - 0.05, 16 * MiB  # 320 MiB/s, measured on 16 chunks  # noqa: SLF001
    assert fetch._run_chunks(plan) > pulling.RUN_CHUNKS  # noqa: SLF001


def test_the_hasher_sees_a_cancel_without_waiting_for_bytes(library: Library, tmp_path: Path) -> None:
    """A resume re-reads what is already on disk without waiting for the network; a cancel (or a
    failed stream) must stop it there too, not only once it catches up with the download."""
    fetch = _fetch_of(library, tmp_path, size=2 * MiB, chunk=MiB)
    fetch._landed = [MiB, MiB]  # noqa: SLF001 - both chunks on disk already
    assert fetch._wait_for_bytes(0, 0) == MiB  # noqa: SLF001
    fetch.cancel.set()
    with pytest.raises(PullCancelled):
        fetch._wait_for_bytes(1, 0)  # noqa: SLF001


# Chunks at page boundaries are hashed through a mapping; others (1_000_003) are read into a buffer.
@pytest.mark.parametrize("chunk", [MiB, 1_000_003])
def test_truncated_blob_fails_then_resumes(hostile: HostileRegistry, library: Library, tmp_path: Path,
                                           chunk: int) -> None:
    weights = os.urandom(3 * MiB)
    digest = Digest.parse(hostile.serve_model(weights))
    hostile.behaviour.stop_at = MiB + 1000
    puller = make_puller(library, tmp_path, chunk=chunk)
    with pytest.raises(RegistryError, match="run the pull again to resume"):
        _pull(puller, _name(hostile))
    assert library.names() == [] and partial_path(library.blobs, digest).exists()
    state = puller.journal.load(digest)
    assert state is not None
    kept = sum(c.completed for c in state.chunks.values())
    assert kept > 0
    hostile.behaviour.stop_at = None
    result = puller.pull(_name(hostile), lambda e: None, insecure=True)
    assert library.blobs.path(digest).read_bytes() == weights
    assert result.fetched_bytes <= len(weights) - kept + 100  # config is tiny; the kept bytes were not refetched


def test_a_registry_that_ignores_range_is_read_whole_by_one_stream(hostile: HostileRegistry, library: Library,
                                                                   tmp_path: Path) -> None:
    """Every blob GET is answered 200 with the whole blob: the first run's answer is kept to the end
    (one request), instead of cut at the run's end with the rest unobtainable."""
    weights = os.urandom(5 * MiB + 3)  # 21 chunks of 256 KiB: more than one run
    digest = Digest.parse(hostile.serve_model(weights))
    hostile.behaviour.no_ranges = True
    _pull(make_puller(library, tmp_path, chunk=256 * 1024), _name(hostile))
    assert library.blobs.path(digest).read_bytes() == weights
    assert len(_blob_gets(hostile, digest)) == 1


def test_a_resume_from_a_registry_that_ignores_range_starts_over(hostile: HostileRegistry, library: Library,
                                                                tmp_path: Path) -> None:
    """A resume needs a range; a registry that answers with the whole blob gets no retries (they
    would each download it again), the partial download is discarded, and the next pull starts at 0."""
    weights = os.urandom(3 * MiB)
    digest = Digest.parse(hostile.serve_model(weights))
    hostile.behaviour.stop_at = MiB + 1000
    puller = make_puller(library, tmp_path, chunk=MiB)
    with pytest.raises(RegistryError):
        _pull(puller, _name(hostile))
    assert partial_path(library.blobs, digest).exists()
    hostile.behaviour.stop_at, hostile.behaviour.no_ranges = None, True
    before = len(_blob_gets(hostile, digest))
    with pytest.raises(RegistryError, match="ignored the Range header.*run the pull again"):
        _pull(puller, _name(hostile))
    assert len(_blob_gets(hostile, digest)) == before + 1
    assert not partial_path(library.blobs, digest).exists() and puller.journal.load(digest) is None
    _pull(puller, _name(hostile))
    assert library.blobs.path(digest).read_bytes() == weights


def test_a_failed_fdatasync_is_not_recorded_as_durable(hostile: HostileRegistry, library: Library, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """FAKE disk error (a failing disk cannot be had on demand): the partial file's first fdatasync
    fails with EIO. Linux reports a writeback error once, so a second fdatasync succeeds although
    the bytes may be lost: nothing of the download may be recorded as durable after the first."""
    weights = os.urandom(3 * MiB)
    digest = Digest.parse(hostile.serve_model(weights))
    real = os.fdatasync
    failed: list[int] = []

    def fails_once(fd: int) -> None:
        if not failed:
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fails_once)
    puller = make_puller(library, tmp_path, chunk=MiB)
    with pytest.raises(BerthError, match="saving the download.*Input/output error"):
        _pull(puller, _name(hostile))
    state = puller.journal.load(digest)
    assert failed and (state is None or all(c.completed == 0 for c in state.chunks.values()))
    monkeypatch.setattr(os, "fdatasync", real)
    _pull(puller, _name(hostile))  # starts again from what is recorded: nothing
    assert library.blobs.path(digest).read_bytes() == weights


def test_registry_that_hangs_mid_body_times_out(hostile: HostileRegistry, library: Library, tmp_path: Path) -> None:
    hostile.serve_model(os.urandom(2 * MiB))
    hostile.behaviour.stop_at = 512 * 1024
    hostile.behaviour.hang = True
    started = time.monotonic()
    with pytest.raises(RegistryError, match="timed out"):
        _pull(make_puller(library, tmp_path, read_timeout=0.3), _name(hostile))
    assert time.monotonic() - started < 20
    assert library.names() == []


def test_dropped_connections_every_mib_still_complete(hostile: HostileRegistry, library: Library,
                                                      tmp_path: Path) -> None:
    weights = os.urandom(5 * MiB + 7)
    digest = Digest.parse(hostile.serve_model(weights))
    hostile.behaviour.drop_every = 300 * 1024
    _pull(make_puller(library, tmp_path, chunk=2 * MiB), _name(hostile))
    assert library.blobs.path(digest).read_bytes() == weights
    assert [str(n) for n in library.names()] == [str(_name(hostile))]


def test_redirect_to_another_host_gets_no_credentials(hostile: HostileRegistry, library: Library,
                                                      tmp_path: Path) -> None:
    weights = os.urandom(MiB)
    hostile.serve_model(weights)
    hostile.behaviour.require_basic = True
    hostile.behaviour.redirect_to = f"http://localhost:{hostile.port}"  # same socket, another host name
    puller = make_puller(library, tmp_path, credentials={hostile.host: Credential("user", "pw")})
    _pull(puller, _name(hostile))
    storage = [r for r in hostile.behaviour.requests if r[1].startswith("/storage/")]
    registry_side = [r for r in hostile.behaviour.requests if r[1].startswith("/v2/") and "Authorization" in r[2]]
    assert storage and registry_side
    assert all("Authorization" not in headers for _, _, headers in storage)


def test_redirect_to_a_non_http_scheme_is_refused(hostile: HostileRegistry, library: Library,
                                                  tmp_path: Path) -> None:
    hostile.serve_model(b"weights")
    hostile.behaviour.redirect_to = "file:///etc"
    with pytest.raises(RegistryRefused, match="only http"):
        _pull(make_puller(library, tmp_path), _name(hostile))


def test_foreign_token_realm_is_refused(hostile: HostileRegistry, library: Library, tmp_path: Path) -> None:
    hostile.serve_model(b"weights")
    hostile.behaviour.bearer_realm = f"http://localhost:{hostile.port}/token"
    puller = make_puller(library, tmp_path, credentials={hostile.host: Credential("user", "secret")})
    with pytest.raises(RegistryRefused, match="does not match the registry host"):
        _pull(puller, _name(hostile))
    assert not [r for r in hostile.behaviour.requests if r[1].startswith("/token")]


def test_same_host_token_realm_is_used(hostile: HostileRegistry, library: Library, tmp_path: Path) -> None:
    hostile.serve_model(b"weights")
    hostile.behaviour.bearer_realm = f"http://{hostile.host}/token"
    _pull(make_puller(library, tmp_path), _name(hostile))
    tokens = [r for r in hostile.behaviour.requests if r[1].startswith("/token")]
    assert len(tokens) == 1 and "scope=repository%3Alibrary%2Fm%3Apull" in tokens[0][1]
    assert all(h.get("Authorization") == "Bearer stolen" for m, p, h in hostile.behaviour.requests[2:]
               if p.startswith("/v2/"))


def test_a_token_answer_that_inflates_is_refused_without_inflating_it(hostile: HostileRegistry, library: Library,
                                                                      tmp_path: Path) -> None:
    """The realm is the registry's own (so allowed), but its answer is a gzip bomb: it is read
    through the size bound as it decodes, not decoded whole first (Ollama's CVE-2024-12886 class)."""
    import tracemalloc

    hostile.serve_model(b"weights")
    hostile.behaviour.bearer_realm = f"http://{hostile.host}/token"
    hostile.behaviour.token_bomb = True
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge, match="token response"):
            _pull(make_puller(library, tmp_path), _name(hostile))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB  # one bomb member inflates to 64 MiB
    assert library.names() == []


def test_retry_after_is_honoured(hostile: HostileRegistry, library: Library, tmp_path: Path) -> None:
    hostile.serve_model(b"weights")
    hostile.behaviour.throttle_first = 1
    started = time.monotonic()
    _pull(make_puller(library, tmp_path), _name(hostile))
    assert time.monotonic() - started >= 0.9


def test_missing_manifest_says_so(hostile: HostileRegistry, library: Library, tmp_path: Path) -> None:
    with pytest.raises(RegistryNotFound, match="pull model manifest: file does not exist"):
        _pull(make_puller(library, tmp_path), _name(hostile))


# -- networks people have: rate caps, proxies, a private CA --------------------------------------------

def test_parse_rate() -> None:
    assert parse_rate("50M") == 50_000_000 and parse_rate("1.5Mi") == int(1.5 * MiB)
    assert parse_rate("800kB/s") == 800_000 and parse_rate("0") is None and parse_rate("") is None
    with pytest.raises(InvalidInput):
        parse_rate("fast")


def test_rate_cap_bounds_throughput(hostile: HostileRegistry, library: Library, tmp_path: Path) -> None:
    weights = os.urandom(8 * MiB)
    digest = Digest.parse(hostile.serve_model(weights))
    puller = make_puller(library, tmp_path, chunk=MiB)
    started = time.monotonic()
    result = puller.pull(_name(hostile), lambda e: None, insecure=True, max_rate=2_000_000)
    elapsed = time.monotonic() - started
    # 8.4 MB at 2 MB/s is 4.2 s less a 0.5 MB burst; four chunk streams share the one bucket.
    assert elapsed >= 3.0, f"{result.fetched_bytes / elapsed / 1e6:.1f} MB/s despite a 2 MB/s cap"
    assert library.blobs.path(digest).read_bytes() == weights


def test_server_wide_rate_cap_is_shared_by_concurrent_pulls(hostile: HostileRegistry, tmp_path: Path) -> None:
    weights = os.urandom(3 * MiB)
    hostile.serve_model(weights)
    libraries = [Library(tmp_path / f"models-{i}") for i in range(2)]
    client = make_puller(libraries[0], tmp_path).client
    cap = RateLimiter(2_000_000)
    pullers = [Puller(lib, client, chunk_size=MiB, parallel=2, rate_limit=cap) for lib in libraries]
    started = time.monotonic()
    threads = [threading.Thread(target=p.pull, args=(_name(hostile), lambda e: None, True)) for p in pullers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # 6.3 MB through one 2 MB/s bucket: about 3 s; two independent caps would take half that.
    assert time.monotonic() - started >= 2.2
    assert all(lib.blobs.path(Digest.of_bytes(weights)).exists() for lib in libraries)
    for lib in libraries:
        lib.close()


class ForwardProxy:
    """A plain-HTTP forward proxy (absolute-URI requests, no CONNECT) that sends every request to
    127.0.0.1 on the URL's port, whatever its host name, and remembers what it forwarded."""

    def __init__(self) -> None:
        seen: list[tuple[str, str]] = []
        self.seen = seen

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                self._forward()

            def do_HEAD(self) -> None:
                self._forward()

            def _forward(self) -> None:
                target = urlsplit(self.path)
                seen.append((self.command, self.path))
                upstream = http.client.HTTPConnection("127.0.0.1", target.port or 80, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")}
                upstream.request(self.command, target.path + (f"?{target.query}" if target.query else ""),
                                 headers=headers)
                answer = upstream.getresponse()
                body = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", answer.getheader("content-length") or str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                upstream.close()

        self.http = LoopbackServer(Handler)
        self.url = self.http.url

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def forward_proxy() -> Iterator[ForwardProxy]:
    proxy = ForwardProxy()
    yield proxy
    proxy.close()


def _client_with(network: NetworkSettings, tmp_path: Path) -> RegistryClient:
    return RegistryClient(CredentialStore(tmp_path / "creds.json", tmp_path / "docker.json"),
                          Timeouts(connect=2, read=5), FAST_RETRY, network=network)


def test_http_proxy_from_the_environment_carries_the_pull(hostile: HostileRegistry, forward_proxy: ForwardProxy,
                                                          library: Library, tmp_path: Path) -> None:
    weights = os.urandom(2 * MiB + 5)
    digest = Digest.parse(hostile.serve_model(weights))
    network = NetworkSettings.from_env({"HTTP_PROXY": forward_proxy.url, "NO_PROXY": "internal.example"})
    # `registry.test` resolves nowhere: only the proxy can have reached the registry.
    name = ModelName.parse(f"registry.test:{hostile.port}/library/m:latest")
    with _client_with(network, tmp_path) as client:
        Puller(library, client, chunk_size=MiB, parallel=2).pull(name, lambda e: None, insecure=True)
    assert library.blobs.path(digest).read_bytes() == weights
    urls = [url for _, url in forward_proxy.seen]
    assert f"http://registry.test:{hostile.port}/v2/library/m/manifests/latest" in urls
    assert any(f"/blobs/{digest}" in url for url in urls)  # the weights came through the proxy too


def test_loopback_and_no_proxy_hosts_bypass_the_proxy(hostile: HostileRegistry, forward_proxy: ForwardProxy,
                                                      library: Library, tmp_path: Path) -> None:
    hostile.serve_model(b"weights")
    network = NetworkSettings.from_env({"http_proxy": forward_proxy.url, "HTTPS_PROXY": "http://127.0.0.1:9"})
    with _client_with(network, tmp_path) as client:
        Puller(library, client).pull(_name(hostile), lambda e: None, insecure=True)
    assert forward_proxy.seen == []
    bypass = NetworkSettings.from_env({"HTTP_PROXY": forward_proxy.url, "NO_PROXY": "registry.test"})
    with _client_with(bypass, tmp_path) as client:
        with pytest.raises(RegistryError):  # direct, and registry.test does not resolve
            Puller(library, client).pull(ModelName.parse(f"registry.test:{hostile.port}/library/m:2"),
                                         lambda e: None, insecure=True)
    assert forward_proxy.seen == []


def test_private_ca_bundle_verifies_a_tls_registry(tls_registry: LocalRegistry, library: Library,
                                                   tmp_path: Path) -> None:
    assert tls_registry.tls_certificate is not None
    name = f"{tls_registry.host}/library/m:latest"
    weights = os.urandom(300_000)
    make_model(library, name, weights)
    trusted = NetworkSettings.from_env({"BERTH_CA_BUNDLE": str(tls_registry.tls_certificate)})
    with _client_with(trusted, tmp_path) as client:
        Pusher(library, client).push(ModelName.parse(name), lambda e: None)  # https, verified
    other = Library(tmp_path / "other")
    try:
        with _client_with(NetworkSettings(), tmp_path) as untrusting:
            with pytest.raises(RegistryError, match="BERTH_CA_BUNDLE"):
                Puller(other, untrusting).pull(ModelName.parse(name), lambda e: None)
        assert other.names() == []
        fallback = NetworkSettings.from_env({"SSL_CERT_FILE": str(tls_registry.tls_certificate)})
        with _client_with(fallback, tmp_path) as client:
            Puller(other, client).pull(ModelName.parse(name), lambda e: None)
        assert other.blobs.path(Digest.of_bytes(weights)).read_bytes() == weights
    finally:
        other.close()


class TlsConnectProxy:
    """An https:// forward proxy: TLS to the proxy itself (a self-signed certificate of its own),
    then CONNECT tunnels to 127.0.0.1 on the requested port, whatever the host name. The client's
    TLS to the registry then runs inside the proxy's TLS. Remembers the CONNECT targets."""

    def __init__(self, directory: Path) -> None:
        self.certificate, key = self_signed_certificate(directory)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certificate, key)
        self.targets: list[str] = []
        self._listener = context.wrap_socket(socket.create_server(("127.0.0.1", 0)), server_side=True)
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()  # the TLS handshake happens here
            except ssl.SSLError:
                continue
            except OSError:
                return  # closed
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: ssl.SSLSocket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                piece = client.recv(4096)
                if not piece:
                    return
                head += piece
            target = head.split(b" ")[1].decode()
            self.targets.append(target)
            with socket.create_connection(("127.0.0.1", int(target.rsplit(":", 1)[1]))) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self._relay(client, upstream)

    @staticmethod
    def _relay(client: ssl.SSLSocket, upstream: socket.socket) -> None:
        """Both directions on one thread (an SSL socket must not be read and written at once from
        two): bytes buffered inside the TLS layer count as readable too."""
        while True:
            ready = [client] if client.pending() else select.select([client, upstream], [], [], 30)[0]
            if not ready:
                return
            for source in ready:
                data = source.recv(65536)
                if not data:
                    return
                (upstream if source is client else client).sendall(data)

    def close(self) -> None:
        self._listener.close()


def test_an_https_proxy_with_a_private_ca_carries_a_tls_pull(tls_registry: LocalRegistry, library: Library,
                                                             tmp_path: Path) -> None:
    """TLS to the registry inside TLS to the proxy: the body must come through the tunnel's TLS
    (reading the proxy's socket directly would write the registry's sealed records into the blob),
    and BERTH_CA_BUNDLE must vouch for the proxy's certificate as well as the registry's."""
    assert tls_registry.tls_certificate is not None
    proxy = TlsConnectProxy(tmp_path / "proxy")
    try:
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(tls_registry.tls_certificate.read_bytes() + proxy.certificate.read_bytes())
        weights = os.urandom(3 * MiB + 5)  # past WHOLE_BLOB_BYTES: ranged chunks, bodies read from the tunnel
        direct = f"{tls_registry.host}/library/m:latest"
        make_model(library, direct, weights)
        network = NetworkSettings.from_env({"BERTH_CA_BUNDLE": str(bundle), "HTTPS_PROXY": proxy.url})
        port = tls_registry.host.rsplit(":", 1)[1]
        other = Library(tmp_path / "other")
        with _client_with(network, tmp_path) as client:
            Pusher(library, client).push(ModelName.parse(direct), lambda e: None)  # loopback: direct
            assert proxy.targets == []
            Puller(other, client, chunk_size=MiB).pull(ModelName.parse(f"{PROXIED_HOST}:{port}/library/m:latest"),
                                                       lambda e: None)
        assert other.blobs.path(Digest.of_bytes(weights)).read_bytes() == weights
        assert set(proxy.targets) == {f"{PROXIED_HOST}:{port}"}
        other.close()
    finally:
        proxy.close()


def _streams_used(hostile: HostileRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Pull 6 MiB in 256 KiB chunks (streams added every 0.25 s); the most bodies sent at once."""
    from berth.registry import pull as pulling

    monkeypatch.setattr(pulling, "RAMP_INTERVAL", 0.25)
    weights = os.urandom(6 * MiB)
    digest = Digest.parse(hostile.serve_model(weights))
    library = Library(tmp_path / "models")
    make_puller(library, tmp_path, chunk=256 * 1024).pull(_name(hostile), lambda e: None, insecure=True)
    assert library.blobs.path(digest).read_bytes() == weights
    library.close()
    return hostile.behaviour.bodies_at_once


def test_streams_are_added_while_they_raise_the_throughput(hostile: HostileRegistry, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection gets 2 MiB/s (a throttled CDN): every stream added raises the throughput,
    so the pull goes from one stream to `parallel` (4)."""
    hostile.behaviour.connection_rate = 2 * MiB
    assert _streams_used(hostile, tmp_path, monkeypatch) == 4


def test_a_stream_that_does_not_raise_the_throughput_is_the_last_one_added(
        hostile: HostileRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All connections share one 2 MiB/s link: the second stream brings nothing, so no third comes."""
    hostile.behaviour.link_rate = 2 * MiB
    assert _streams_used(hostile, tmp_path, monkeypatch) == 2


def test_a_damaged_chunk_of_a_partial_file_is_fetched_again_alone(hostile: HostileRegistry, tmp_path: Path) -> None:
    weights = os.urandom(6 * MiB)
    digest = Digest.parse(hostile.serve_model(weights))
    hostile.behaviour.stop_at = 4 * MiB + 17
    library = Library(tmp_path / "models")
    with pytest.raises(RegistryError, match="resume"):
        make_puller(library, tmp_path).pull(_name(hostile), lambda e: None, insecure=True)
    state = make_puller(library, tmp_path).journal.load(digest)
    assert state is not None and state.chunks[0].checksum is not None  # chunk 0 whole, checksummed, durable
    with open(partial_path(library.blobs, digest), "r+b") as partial:  # disk damage between runs
        partial.seek(1000)
        partial.write(b"\xff" * 8)
    hostile.behaviour.stop_at = None
    kept = sum(c.completed for c in state.chunks.values())
    result = make_puller(library, tmp_path).pull(_name(hostile), lambda e: None, insecure=True)
    assert library.blobs.path(digest).read_bytes() == weights
    assert result.fetched_bytes <= len(weights) - kept + MiB + 1024  # the rest plus the damaged chunk
    library.close()


def test_a_partial_download_recorded_before_checksums_were_named_still_resumes(hostile: HostileRegistry,
                                                                                tmp_path: Path) -> None:
    """Catalog revision 0003 kept a bare sha256 per chunk; 0004 names it, and a resume still checks it."""
    from alembic import command

    from berth.registry.catalog import database

    weights = os.urandom(3 * MiB)
    digest = Digest.parse(hostile.serve_model(weights))
    models = tmp_path / "models"
    engine = database.open_engine(models)
    config = database.alembic_config(str(engine.url))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0003")
    blobs = models / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    partial = blobs / f"{digest.filename}-partial"
    partial.write_bytes(weights[:2 * MiB] + b"\0" * MiB)
    with engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO partial_downloads VALUES (?, ?, ?, '2026-11-26 00:00:00')",
                                   (str(digest), len(weights), MiB))
        connection.exec_driver_sql("INSERT INTO partial_chunks VALUES (?, 0, ?, ?)",
                                   (str(digest), MiB, hashlib.sha256(weights[:MiB]).hexdigest()))
        connection.exec_driver_sql("INSERT INTO partial_chunks VALUES (?, 1, ?, ?)",  # damaged since
                                   (str(digest), MiB, hashlib.sha256(b"x").hexdigest()))
    engine.dispose()

    library = Library(models)  # upgrades the catalog to the head revision
    puller = make_puller(library, tmp_path)
    state = puller.journal.load(digest)
    assert state is not None and state.chunks[0].checksum == f"sha256:{hashlib.sha256(weights[:MiB]).hexdigest()}"
    result = puller.pull(_name(hostile), lambda e: None, insecure=True)
    assert library.blobs.path(digest).read_bytes() == weights
    assert result.fetched_bytes <= 2 * MiB + 1024  # chunk 0 kept; chunk 1 (wrong check) and 2 fetched
    library.close()


def test_a_pull_right_after_a_cancelled_one_does_not_inherit_the_cancel(hostile: HostileRegistry,
                                                                        tmp_path: Path) -> None:
    """Ctrl-C then the same pull again at once: the first download may still be stopping (its stream
    blocked in a read), and the second must start its own instead of joining the cancelled one."""
    weights = os.urandom(2 * MiB)
    digest = Digest.parse(hostile.serve_model(weights))
    hostile.behaviour.connection_rate = 256 * 1024  # a 64 KiB piece every 0.25 s: the stream is slow to notice
    library = Library(tmp_path / "models")
    puller = make_puller(library, tmp_path)
    cancel = threading.Event()

    def stop_after_some(event: dict[str, Any]) -> None:
        if event.get("digest") == str(digest) and event.get("completed", 0) > 0:
            cancel.set()

    with pytest.raises(PullCancelled):
        puller.pull(_name(hostile), stop_after_some, insecure=True, cancel=cancel)
    assert digest in puller.downloads.active()  # still stopping: the case under test
    hostile.behaviour.connection_rate = None
    puller.pull(_name(hostile), lambda e: None, insecure=True)
    assert library.blobs.path(digest).read_bytes() == weights and library.names()
    library.close()


def _pull_in_thread(puller: Puller, hostile: HostileRegistry, events: list[dict[str, Any]],
                    cancel: threading.Event | None = None) -> tuple[threading.Thread, list[Any]]:
    """The pull runs on a thread; the list gets its PullResult or its exception."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(puller.pull(_name(hostile), events.append, insecure=True, cancel=cancel))
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _wait_for_progress(events: list[dict[str, Any]], digest: Digest, at_least: int) -> None:
    deadline = time.monotonic() + 15
    while not any(e.get("digest") == str(digest) and e.get("completed", 0) >= at_least for e in list(events)):
        assert time.monotonic() < deadline, "the first pull made no progress"
        time.sleep(0.02)


def test_a_blob_another_process_is_downloading_is_waited_for_not_fetched_twice(hostile: HostileRegistry,
                                                                             tmp_path: Path) -> None:
    """Two servers (or `berth` beside a server) on one store: the partial file's lock makes the
    second wait for the first's download (two Library objects here: flock treats their separate
    opens exactly as it treats two processes)."""
    weights = os.urandom(3 * MiB)
    digest = Digest.parse(hostile.serve_model(weights))
    hostile.behaviour.connection_rate = 3 * MiB  # about a second
    first_library, second_library = Library(tmp_path / "models"), Library(tmp_path / "models")
    events: list[dict[str, Any]] = []
    thread, outcome = _pull_in_thread(make_puller(first_library, tmp_path), hostile, events)
    _wait_for_progress(events, digest, 1)
    result = make_puller(second_library, tmp_path).pull(_name(hostile), lambda e: None, insecure=True)
    thread.join(30)
    assert [type(o) for o in outcome] == [PullResult]
    assert result.fetched_bytes < 4096  # at most the config blob: the weights came from the first
    assert second_library.blobs.path(digest).read_bytes() == weights and second_library.names()
    assert not partial_path(second_library.blobs, digest).exists()
    first_library.close()
    second_library.close()


def test_a_download_another_process_gave_up_is_resumed_not_restarted(hostile: HostileRegistry,
                                                                     tmp_path: Path) -> None:
    weights = os.urandom(4 * MiB)
    digest = Digest.parse(hostile.serve_model(weights))
    hostile.behaviour.connection_rate = 2 * MiB
    first_library, second_library = Library(tmp_path / "models"), Library(tmp_path / "models")
    events: list[dict[str, Any]] = []
    cancel = threading.Event()
    first, first_outcome = _pull_in_thread(make_puller(first_library, tmp_path), hostile, events, cancel)
    _wait_for_progress(events, digest, 2 * MiB)
    second, second_outcome = _pull_in_thread(make_puller(second_library, tmp_path), hostile, [])
    time.sleep(0.3)  # the second is waiting on the first's lock
    cancel.set()
    first.join(30)
    assert len(first_outcome) == 1 and isinstance(first_outcome[0], PullCancelled)
    hostile.behaviour.connection_rate = None
    second.join(30)
    assert len(second_outcome) == 1 and isinstance(second_outcome[0], PullResult), second_outcome
    assert second_library.blobs.path(digest).read_bytes() == weights
    # It took over from what the first had recorded (2 MiB at least), less at most one 1 MiB chunk.
    assert second_outcome[0].fetched_bytes <= len(weights) - 2 * MiB + MiB + 4096
    first_library.close()
    second_library.close()


class _LastStepFetch:
    """Stands in for a BlobFetch in its last step (the final sync and rename), which a cancel no
    longer stops: the window is too short to hit on purpose with a real download."""

    made = 0

    def __init__(self, finish: threading.Event, fails: bool = False) -> None:
        self.cancel = threading.Event()
        self.finish = finish
        self.fails = fails
        _LastStepFetch.made += 1

    def run(self) -> None:
        self.finish.wait(30)
        if self.fails:
            raise RegistryError("the registry went away")


def test_a_download_that_completes_after_its_last_waiter_left_is_not_fetched_again() -> None:
    downloads, finish, digest = SharedDownloads(), threading.Event(), Digest("a" * 64)
    _LastStepFetch.made = 0
    first = downloads.join(digest, lambda: _LastStepFetch(finish))  # type: ignore[arg-type,return-value]
    downloads.leave(first)  # its only waiter went (Ctrl-C): cancelled, but past caring
    assert first.fetch.cancel.is_set()
    threading.Timer(0.3, finish.set).start()
    again = downloads.join(digest, lambda: _LastStepFetch(finish))  # type: ignore[arg-type,return-value]
    assert again is first and again.done.is_set() and again.error is None and _LastStepFetch.made == 1


def test_waiting_for_a_stopping_download_ends_with_the_pulls_own_cancel() -> None:
    downloads, finish, digest = SharedDownloads(), threading.Event(), Digest("b" * 64)
    first = downloads.join(digest, lambda: _LastStepFetch(finish))  # type: ignore[arg-type,return-value]
    downloads.leave(first)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    with pytest.raises(PullCancelled):
        downloads.join(digest, lambda: _LastStepFetch(finish), cancel)  # type: ignore[arg-type,return-value]
    finish.set()


def test_a_stopped_download_that_failed_is_replaced_by_a_new_one() -> None:
    downloads, finish, digest = SharedDownloads(), threading.Event(), Digest("c" * 64)
    _LastStepFetch.made = 0
    first = downloads.join(digest, lambda: _LastStepFetch(finish, fails=True))  # type: ignore[arg-type,return-value]
    downloads.leave(first)
    threading.Timer(0.3, finish.set).start()
    fresh = downloads.join(digest, lambda: _LastStepFetch(threading.Event()))  # type: ignore[arg-type,return-value]
    assert fresh is not first and isinstance(first.error, RegistryError) and _LastStepFetch.made == 2
    fresh.fetch.finish.set()  # type: ignore[attr-defined]
