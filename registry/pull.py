"""Pulling a model from an OCI registry: manifest, verified resumable blob downloads, then the tag.

Sequence and progress statuses follow Ollama (spec/ollama-registry.md §4): `pulling manifest`,
`pulling <12hex>` per blob (layers, then config), `verifying sha256 digest`, `writing manifest`,
`success`. Differences, on purpose:

* The manifest is asked for in both Docker v2 and OCI form, bounded to 4 MiB, kept byte for byte,
  and every digest in it is validated (`Manifest.parse`) before any path or URL is built from it.
* A missing blob is fetched as fixed-size chunks over parallel `Range` requests into
  `blobs/sha256-<hex>-partial` (not a blob name, so nothing can mistake it for a finished blob).
  Chunk threads pwrite what arrives (gathered into 1 MiB writes) and every 4 MiB fdatasync it and
  only then record it in the catalog (registry/catalog/downloads.py): the catalog never claims a
  byte a crash could lose, and since data is flushed as it arrives the closing fsync is short (it
  used to be most of a pull's time). Each chunk thread hashes its chunk's bytes in memory as they
  arrive (the hash is recorded with the chunk's last checkpoint); one more thread hashes the whole
  blob in order, following the bytes as they land, so the digest is known when the last byte lands:
  no second pass over the file. A killed pull resumes: the durable chunks are re-hashed once (each
  checked against its recorded hash; a damaged one is fetched again) and only the rest is fetched.
* Rate caps (registry/rate.py) are token buckets shared by all chunk threads.
* A blob whose bytes do not match is deleted with its partial state and the pull fails; the tag is
  committed (one transaction, `Library.tag`) only after every blob is in the store, verified.
* Two pulls of the same blob in one server share one download (`SharedDownloads`, owned by the
  app); when the last one waiting gives up, the download stops and its partial file stays for later.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

from registry.blobstore import BlobStore
from registry.catalog.downloads import DownloadJournal
from registry.digest import Digest
from registry.errors import BerthError, DigestMismatch, InvalidInput
from registry.library import Library
from registry.manifest import DOCKER_MANIFEST, MANIFEST_TYPES, MAX_MANIFEST_BYTES, Descriptor, Manifest
from registry.names import ModelName
from registry.oci import (RegistryClient, RegistryError, RegistryNotFound, RegistryRefused, RegistryUnauthorized,
                          Repository, describe, read_bounded)
from registry.rate import RateLimiter
from registry.signing import Signatures
from registry.trust import TrustMode, TrustPolicy, UntrustedModel, decide

Event = dict[str, Any]
Emit = Callable[[Event], None]

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
DEFAULT_PARALLEL = 4
# A chunk's landed bytes are made durable (fdatasync) and recorded in the catalog this often, so a
# kill loses at most this much per stream, and the final fsync finds almost nothing left to write.
CHECKPOINT_BYTES = 4 * 1024 * 1024
WRITE_SIZE = 1024 * 1024
HASH_READ = 4 * 1024 * 1024
PROGRESS_INTERVAL = 0.1
PARTIAL_SUFFIX = "-partial"


class BlobDigestMismatch(DigestMismatch):
    """A downloaded blob hashed to something else; its partial file is already gone."""

    def __init__(self, expected: Digest, actual: Digest, host: str) -> None:
        super().__init__(str(expected), str(actual))
        self.message = (f"digest mismatch, file must be downloaded again: want {expected}, got {actual} "
                        f"(blob from {host}; the bad download was discarded, nothing was tagged)")


class PullCancelled(BerthError):
    """Every client waiting for a pull went away; partial files stay for the next pull."""


def progress(status: str, digest: Digest | None = None, total: int = 0, completed: int = 0) -> Event:
    """An Ollama ProgressResponse: zero-valued fields are left out, as Go's `omitempty` does."""
    event: Event = {"status": status}
    if digest is not None:
        event["digest"] = str(digest)
    if total:
        event["total"] = total
    if completed:
        event["completed"] = completed
    return event


def partial_path(store: BlobStore, digest: Digest) -> Path:
    return store.blobs_dir / f"{digest.filename}{PARTIAL_SUFFIX}"


@dataclass(frozen=True)
class ChunkPlan:
    size: int
    chunk_size: int

    @property
    def count(self) -> int:
        return (self.size + self.chunk_size - 1) // self.chunk_size

    def bounds(self, idx: int) -> tuple[int, int]:
        """[start, end) of chunk `idx`."""
        start = idx * self.chunk_size
        return start, min(self.size, start + self.chunk_size)


class BlobFetch:
    """Downloads one blob into its partial file and publishes it into the store once verified.

    Three kinds of state per chunk, each moving forward only: bytes *landed* (written to the page
    cache, shown as progress and followed by the hasher), bytes *durable* (fdatasync'd; the only
    figure the catalog ever records, so a resume never trusts bytes a crash could have lost), and
    the chunk's sha256 once the in-order hasher has passed it.
    """

    def __init__(self, client: RegistryClient, repo: Repository, desc: Descriptor, store: BlobStore,
                 journal: DownloadJournal, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 parallel: int = DEFAULT_PARALLEL, limiters: tuple[RateLimiter, ...] = ()) -> None:
        self.client = client
        self.repo = repo
        self.desc = desc
        self.store = store
        self.journal = journal
        self.chunk_size = chunk_size
        self.parallel = parallel
        self.limiters = limiters
        self.cancel = threading.Event()
        self.total = desc.size
        self.fetched = 0  # bytes received from the network in this run (the resume figure)
        self._cond = threading.Condition()
        self._landed: list[int] = []
        self._durable: list[int] = []
        self._chunk_sha: dict[int, str] = {}
        self._hashing = -1  # the chunk the hasher waits on: only its writer needs to wake it
        self._failure: BaseException | None = None
        # Serialises catalog writes so a slower writer cannot overwrite a newer figure with an older one.
        self._journal_lock = threading.Lock()

    @property
    def completed(self) -> int:
        with self._cond:
            return sum(self._landed)

    def run(self) -> None:
        digest = self.desc.digest
        path = partial_path(self.store, digest)
        plan, hashes = self._prepare(path)
        fd = os.open(path, os.O_RDWR)
        try:
            with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="pull-chunk") as pool:
                futures: dict[int, Future[None]] = {}
                for idx in range(plan.count):
                    if self._landed[idx] < self._length(plan, idx):
                        futures[idx] = pool.submit(self._fetch_chunk_guarded, fd, plan, idx)
                try:
                    actual = self._hash_in_order(fd, plan, hashes, pool, futures)
                except BaseException:
                    self.cancel.set()  # stop the other chunks; what is durable stays for a resume
                    raise
            if actual != digest:
                os.close(fd)
                fd = -1
                self._discard(path)
                raise BlobDigestMismatch(digest, actual, self.repo.host)
            # Every chunk was fdatasync'd as it completed, so this only settles the inode.
            os.fsync(fd)
        finally:
            if fd >= 0:
                os.close(fd)
        os.chmod(path, 0o644)
        os.replace(path, self.store.path(digest))
        self.store.sync_dir()
        self.journal.forget(digest)

    # -- preparation ----------------------------------------------------------------------------

    def _prepare(self, path: Path) -> tuple[ChunkPlan, dict[int, str]]:
        """Resume from recorded state when it still fits the file on disk; else start afresh."""
        digest, size = self.desc.digest, self.desc.size
        state = self.journal.load(digest)
        if state is not None and state.size == size and path.is_file() and path.stat().st_size == size:
            plan = ChunkPlan(size, state.chunk_size)
            self._landed = [min(state.chunks[i].completed, self._length(plan, i)) if i in state.chunks else 0
                            for i in range(plan.count)]
            self._durable = list(self._landed)
            hashes = {i: c.sha256 for i, c in state.chunks.items() if c.sha256}
            return plan, hashes
        plan = ChunkPlan(size, self.chunk_size)
        self.journal.start(digest, size, plan.chunk_size)
        with open(path, "wb") as handle:
            handle.truncate(size)
        self._landed = [0] * plan.count
        self._durable = [0] * plan.count
        return plan, {}

    @staticmethod
    def _length(plan: ChunkPlan, idx: int) -> int:
        start, end = plan.bounds(idx)
        return end - start

    def _discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.journal.forget(self.desc.digest)

    # -- durability --------------------------------------------------------------------------------

    def _make_durable(self, fd: int, idx: int) -> None:
        """fdatasync what has landed of chunk `idx`, then (and only then) record it in the catalog."""
        with self._cond:
            landed = self._landed[idx]
            if landed <= self._durable[idx]:
                return
        os.fdatasync(fd)
        with self._cond:
            self._durable[idx] = max(self._durable[idx], landed)
        self._checkpoint(idx)

    def _checkpoint(self, idx: int) -> None:
        with self._journal_lock:
            with self._cond:
                durable, sha = self._durable[idx], self._chunk_sha.get(idx)
            self.journal.record(self.desc.digest, idx, durable, sha)

    def _restart_chunk(self, idx: int) -> None:
        """Forget a chunk whose bytes on disk no longer match its recorded hash."""
        with self._journal_lock:
            with self._cond:
                self._landed[idx] = self._durable[idx] = 0
                self._chunk_sha.pop(idx, None)
            self.journal.record(self.desc.digest, idx, 0)

    # -- hashing ---------------------------------------------------------------------------------

    def _hash_in_order(self, fd: int, plan: ChunkPlan, recorded: dict[int, str], pool: ThreadPoolExecutor,
                       futures: dict[int, Future[None]]) -> Digest:
        """Feed bytes to the blob's hash in order as they land (one pass, overlapped with the download).

        Chunk hashes are computed by the chunk threads as bytes arrive (in parallel, on other cores);
        this thread computes one only to check a chunk an earlier run recorded."""
        whole = hashlib.sha256()
        for idx in range(plan.count):
            while idx in recorded:
                chunk_hash = hashlib.sha256()
                candidate = whole.copy()
                self._hash_range(fd, plan, idx, (chunk_hash, candidate))
                if chunk_hash.hexdigest() == recorded.pop(idx):
                    whole = candidate
                    break
                # The bytes on disk changed since they were hashed (disk damage, tampering): fetch again.
                self._restart_chunk(idx)
                futures[idx] = pool.submit(self._fetch_chunk_guarded, fd, plan, idx)
            else:
                self._hash_range(fd, plan, idx, (whole,))
        return Digest(whole.hexdigest())

    def _hash_range(self, fd: int, plan: ChunkPlan, idx: int, hashes: tuple["hashlib._Hash", ...]) -> None:
        start, end = plan.bounds(idx)
        offset = start
        while offset < end:
            landed_end = start + self._wait_for_bytes(idx, offset - start)
            while offset < landed_end:
                # Just written, so this reads from the page cache, not the disk; sha256 releases
                # the GIL on large updates, so this thread hashes while the others download.
                data = os.pread(fd, min(HASH_READ, landed_end - offset), offset)
                if not data:
                    raise BerthError(f"partial file of {self.desc.digest} is shorter than expected; pull again")
                for running in hashes:
                    running.update(data)
                offset += len(data)

    def _wait_for_bytes(self, idx: int, hashed: int) -> int:
        """Block until chunk `idx` has more than `hashed` bytes landed; return how many it has."""
        with self._cond:
            self._hashing = idx
            while self._landed[idx] <= hashed:
                if self._failure is not None:
                    raise self._failure
                if self.cancel.is_set():
                    raise PullCancelled("pull cancelled; run it again to resume")
                self._cond.wait(0.2)
            return self._landed[idx]

    # -- fetching --------------------------------------------------------------------------------

    def _fetch_chunk_guarded(self, fd: int, plan: ChunkPlan, idx: int) -> None:
        try:
            self._fetch_chunk(fd, plan, idx)
        except BaseException as exc:  # noqa: BLE001 - handed to the hashing thread, which raises it
            with self._cond:
                if self._failure is None and not isinstance(exc, PullCancelled):
                    self._failure = exc
                self._cond.notify_all()

    def _fetch_chunk(self, fd: int, plan: ChunkPlan, idx: int) -> None:
        start, end = plan.bounds(idx)
        url = self.repo.blob_url(self.desc.digest)
        scope = self.repo.scope("pull")
        failures = 0
        last_error = ""
        chunk_hash = self._seed_chunk_hash(fd, start, self._landed_of(idx))
        while True:
            done = self._landed_of(idx)
            if start + done >= end:
                return
            if self.cancel.is_set():
                raise PullCancelled("pull cancelled")
            before = done
            try:
                self._stream_range(fd, url, scope, idx, start, end, done, chunk_hash)
            except (RegistryRefused, RegistryUnauthorized):
                raise  # retrying cannot help, and must not (a refusal is a security decision)
            except (httpx.TransportError, RegistryError) as exc:
                last_error = describe(exc) if isinstance(exc, httpx.TransportError) else str(exc)
            done = self._landed_of(idx)
            if start + done >= end:
                return
            # A connection that delivered bytes before dropping is not a failure: resume at once.
            failures = 0 if done > before else failures + 1
            if failures >= self.client.retry.attempts:
                raise RegistryError(
                    f"downloading {self.desc.digest} from {self.repo.host} stopped at byte {start + done} of "
                    f"{self.total} after {failures} attempts without progress ({last_error or 'body ended early'});"
                    " run the pull again to resume from there")
            time.sleep(self.client.retry.backoff(failures - 1) if failures else 0)

    def _seed_chunk_hash(self, fd: int, start: int, done: int) -> "hashlib._Hash":
        """A chunk's running hash, fed the bytes an earlier run left of it (a resume mid-chunk)."""
        chunk_hash = hashlib.sha256()
        offset = start
        while offset < start + done:
            data = os.pread(fd, min(HASH_READ, start + done - offset), offset)
            if not data:
                raise BerthError(f"partial file of {self.desc.digest} is shorter than expected; pull again")
            chunk_hash.update(data)
            offset += len(data)
        return chunk_hash

    def _stream_range(self, fd: int, url: str, scope: str, idx: int, start: int, end: int, done: int,
                      chunk_hash: "hashlib._Hash") -> None:
        offset = start + done
        headers = {"Range": f"bytes={offset}-{end - 1}", "Accept-Encoding": "identity"}
        with self.client.stream("GET", url, self.repo, scope, headers=headers, ok=(200, 206)) as response:
            if response.status_code == 200 and offset != 0:
                raise RegistryError(f"{self.repo.host} ignored the Range header for {self.desc.digest}; "
                                    "this registry cannot serve resumable downloads")
            if response.status_code == 206:
                served = response.headers.get("content-range", "")
                if not served.startswith(f"bytes {offset}-"):
                    raise RegistryError(f"{self.repo.host} answered range {served!r} for bytes={offset}-")
            try:
                self._copy_body(fd, response, idx, start, end, offset, chunk_hash)
            finally:
                # Whatever landed is made durable and recorded even when the attempt dies, so a
                # resume skips it.
                self._make_durable(fd, idx)

    def _landed_of(self, idx: int) -> int:
        with self._cond:
            return self._landed[idx]

    def _copy_body(self, fd: int, response: httpx.Response, idx: int, start: int, end: int, offset: int,
                   chunk_hash: "hashlib._Hash") -> None:
        # Body pieces arrive as 64 KiB reads; they are gathered into WRITE_SIZE writes because every
        # pwrite, lock and wake-up is a GIL hand-off, and with several streams plus the hasher
        # those hand-offs, not the disk, were what limited throughput. The buffer is written out in
        # `finally`, so bytes that arrived before a dropped connection are kept for the retry.
        buffer = bytearray()
        unsynced = 0
        try:
            # Raw bytes: no content decoding, so a compressed body cannot expand (a gzip bomb is
            # just wrong bytes, caught by the digest).
            for data in response.iter_raw():
                if self.cancel.is_set():
                    raise PullCancelled("pull cancelled")
                take = min(len(data), end - offset - len(buffer))
                if take <= 0:
                    break
                buffer += memoryview(data)[:take]
                if len(buffer) < WRITE_SIZE and offset + len(buffer) < end:
                    continue
                offset = self._land(fd, idx, start, end, offset, buffer, chunk_hash)
                unsynced += len(buffer)
                buffer.clear()
                if unsynced >= CHECKPOINT_BYTES or offset >= end:
                    self._make_durable(fd, idx)
                    unsynced = 0
                if offset >= end:
                    break
        finally:
            if buffer:
                self._land(fd, idx, start, end, offset, buffer, chunk_hash)

    def _land(self, fd: int, idx: int, start: int, end: int, offset: int, data: bytearray,
              chunk_hash: "hashlib._Hash") -> int:
        """Write received bytes at `offset`, publish them as landed, pay the rate caps; new offset.

        The chunk's hash is taken from these bytes in memory, on this thread: the in-order hasher
        then has only the blob's digest to compute, and chunk threads hash in parallel."""
        _pwrite_all(fd, memoryview(data), offset)
        chunk_hash.update(data)
        offset += len(data)
        with self._cond:
            if offset >= end:
                self._chunk_sha[idx] = chunk_hash.hexdigest()  # recorded with the chunk's last checkpoint
            self._landed[idx] = offset - start
            self.fetched += len(data)
            if self._hashing == idx:
                self._cond.notify_all()
        for limiter in self.limiters:
            limiter.consume(len(data), self.cancel.is_set)
        return offset


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite may write less than asked (signals, quotas); loop until all of it is in the file."""
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


@dataclass
class _Shared:
    fetch: BlobFetch
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    waiters: int = 0


class SharedDownloads:
    """Blob downloads in flight in this process, by digest. The app owns one (no module state)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[Digest, _Shared] = {}

    def join(self, digest: Digest, make: Callable[[], BlobFetch]) -> _Shared:
        with self._lock:
            shared = self._active.get(digest)
            if shared is None:
                shared = _Shared(make())
                self._active[digest] = shared
                threading.Thread(target=self._run, args=(digest, shared), name=f"pull-{digest.short}",
                                 daemon=True).start()
            shared.waiters += 1
            return shared

    def leave(self, shared: _Shared) -> None:
        with self._lock:
            shared.waiters -= 1
            if shared.waiters <= 0 and not shared.done.is_set():
                shared.fetch.cancel.set()

    def active(self) -> list[Digest]:
        with self._lock:
            return list(self._active)

    def _run(self, digest: Digest, shared: _Shared) -> None:
        try:
            shared.fetch.run()
        except BaseException as exc:  # noqa: BLE001 - every waiter re-raises it
            shared.error = exc
        finally:
            with self._lock:
                self._active.pop(digest, None)
            shared.done.set()


@dataclass
class PullResult:
    manifest: Manifest
    fetched_bytes: int


def fetch_manifest(client: RegistryClient, repo: Repository, reference: str) -> Manifest:
    """The manifest as served (bounded, every digest validated, its digest checked against the header)."""
    headers = {"Accept": ", ".join(MANIFEST_TYPES)}
    try:
        response = client.request("GET", repo.manifest_url(reference), repo, repo.scope("pull"), headers=headers)
    except RegistryNotFound:
        raise RegistryNotFound("pull model manifest: file does not exist") from None
    served_digest = response.headers.get("docker-content-digest")
    raw = read_bounded(response, MAX_MANIFEST_BYTES, "manifest")
    manifest = Manifest.parse(raw)
    if served_digest and served_digest != str(manifest.digest):
        raise InvalidInput(f"the registry says the manifest is {served_digest} but its bytes hash to "
                           f"{manifest.digest}; refusing it")
    return manifest


class Puller:
    """Pulls models into a Library. Thread-safe; one per app."""

    def __init__(self, library: Library, client: RegistryClient, downloads: SharedDownloads | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, parallel: int = DEFAULT_PARALLEL,
                 rate_limit: RateLimiter | None = None, trust: TrustPolicy = TrustPolicy()) -> None:
        """`rate_limit` caps all pulls that share it (the server's `BERTH_MAX_DOWNLOAD_RATE`);
        `trust` says which models must be signed (`BERTH_TRUST_POLICY`, registry/trust.py)."""
        self.library = library
        self.client = client
        self.downloads = downloads or SharedDownloads()
        self.journal = DownloadJournal(library)
        self.chunk_size = chunk_size
        self.parallel = parallel
        self.rate_limit = rate_limit
        self.trust = trust

    def fetch_manifest(self, repo: Repository, reference: str) -> Manifest:
        return fetch_manifest(self.client, repo, reference)

    def pull(self, name: ModelName, emit: Emit, insecure: bool = False,
             cancel: threading.Event | None = None, max_rate: int | None = None) -> PullResult:
        """Pull `name` and tag it. `max_rate` (bytes/s) caps this pull on top of the Puller's own cap;
        a blob another pull is already downloading keeps the caps that download started with."""
        cancel = cancel or threading.Event()
        repo = Repository.of(name, insecure)
        emit(progress("pulling manifest"))
        manifest = self.fetch_manifest(repo, name.tag)
        self._check_trust(repo, manifest, emit)
        limiters = tuple(limit for limit in (self.rate_limit, RateLimiter(max_rate) if max_rate else None)
                         if limit is not None)
        fetched = 0
        with self.library.pinned([desc.digest for desc in manifest.blobs()]):
            for desc in manifest.blobs():
                fetched += self._ensure_blob(repo, desc, emit, cancel, limiters)
            # Each blob was hashed as it landed; this status is kept for clients that wait for it.
            emit(progress("verifying sha256 digest"))
            emit(progress("writing manifest"))
            self.library.tag(name, manifest)
        emit(progress("success"))
        return PullResult(manifest, fetched)

    def _check_trust(self, repo: Repository, manifest: Manifest, emit: Emit) -> None:
        """Before any blob is fetched or tag written: enforce refuses, warn says so, off skips."""
        if self.trust.rule_for(repo.host, repo.path).mode is TrustMode.OFF:
            return
        emit(progress("verifying signature"))
        decision = decide(Signatures(self.client), self.trust, repo, manifest.digest)
        if decision.check is not None and decision.check.verified:
            return
        if decision.rule.mode is TrustMode.ENFORCE:
            raise UntrustedModel(f"refusing {repo.host}/{repo.path}: {decision.message} (BERTH_TRUST_POLICY "
                                 "enforces signatures here); nothing was downloaded or tagged")
        emit(progress(f"warning: {decision.message}"))

    def _ensure_blob(self, repo: Repository, desc: Descriptor, emit: Emit, cancel: threading.Event,
                     limiters: tuple[RateLimiter, ...] = ()) -> int:
        status = f"pulling {desc.digest.short}"
        store = self.library.blobs
        if store.exists(desc.digest):
            size = store.size(desc.digest)
            emit(progress(status, desc.digest, size, size))
            return 0
        shared = self.downloads.join(desc.digest, lambda: BlobFetch(
            self.client, repo, desc, store, self.journal, self.chunk_size, self.parallel, limiters))
        try:
            last = -1
            while not shared.done.wait(PROGRESS_INTERVAL):
                if cancel.is_set():
                    raise PullCancelled("pull cancelled; run it again to resume")
                completed = shared.fetch.completed
                if completed != last:
                    emit(progress(status, desc.digest, desc.size, completed))
                    last = completed
            if shared.error is not None:
                raise shared.error
            emit(progress(status, desc.digest, desc.size, desc.size))
            return shared.fetch.fetched
        finally:
            self.downloads.leave(shared)


__all__ = ["BlobFetch", "DOCKER_MANIFEST", "PullCancelled", "PullResult", "Puller", "SharedDownloads",
           "fetch_manifest", "partial_path", "progress"]
