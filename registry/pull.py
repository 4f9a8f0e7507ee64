"""Pulling a model from an OCI registry: manifest, verified resumable blob downloads, then the tag.

Sequence and progress statuses follow Ollama (spec/ollama-registry.md §4): `pulling manifest`,
`pulling <12hex>` per blob (layers, then config), `verifying sha256 digest`, `writing manifest`,
`success`. Differences, on purpose:

* The manifest is asked for in both Docker v2 and OCI form, bounded to 4 MiB, kept byte for byte,
  and every digest in it is validated (`Manifest.parse`) before any path or URL is built from it.
* A missing blob is fetched as fixed-size chunks over parallel `Range` requests into
  `blobs/sha256-<hex>-partial` (not a blob name, so nothing can mistake it for a finished blob).
  Bytes on disk per chunk are recorded in the catalog as they land (registry/catalog/downloads.py);
  one thread hashes chunks in order as soon as each is complete, so the blob's digest is known when
  the last byte lands: no second pass over the file. A killed pull resumes: the chunks already on
  disk are re-hashed once (each checked against its recorded hash) and only the rest is fetched.
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

Event = dict[str, Any]
Emit = Callable[[Event], None]

DEFAULT_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_PARALLEL = 8
# Progress of a chunk is written to the catalog at least this often (bytes), so a kill loses little.
SAVE_EVERY = 1024 * 1024
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
    """Downloads one blob into its partial file and publishes it into the store once verified."""

    def __init__(self, client: RegistryClient, repo: Repository, desc: Descriptor, store: BlobStore,
                 journal: DownloadJournal, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 parallel: int = DEFAULT_PARALLEL) -> None:
        self.client = client
        self.repo = repo
        self.desc = desc
        self.store = store
        self.journal = journal
        self.chunk_size = chunk_size
        self.parallel = parallel
        self.cancel = threading.Event()
        self.total = desc.size
        self.fetched = 0  # bytes received from the network in this run (the resume figure)
        self._cond = threading.Condition()
        self._on_disk: list[int] = []
        self._failure: BaseException | None = None

    @property
    def completed(self) -> int:
        with self._cond:
            return sum(self._on_disk)

    def run(self) -> None:
        digest = self.desc.digest
        path = partial_path(self.store, digest)
        plan, hashes = self._prepare(path)
        fd = os.open(path, os.O_RDWR)
        try:
            with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="pull-chunk") as pool:
                futures: dict[int, Future[None]] = {}
                for idx in range(plan.count):
                    if self._on_disk[idx] < self._length(plan, idx):
                        futures[idx] = pool.submit(self._fetch_chunk_guarded, fd, plan, idx)
                try:
                    actual = self._hash_in_order(fd, plan, hashes, pool, futures)
                except BaseException:
                    self.cancel.set()  # stop the other chunks; what is on disk stays for a resume
                    raise
            if actual != digest:
                os.close(fd)
                fd = -1
                self._discard(path)
                raise BlobDigestMismatch(digest, actual, self.repo.host)
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
            self._on_disk = [min(state.chunks[i].completed, self._length(plan, i)) if i in state.chunks else 0
                             for i in range(plan.count)]
            hashes = {i: c.sha256 for i, c in state.chunks.items() if c.sha256}
            return plan, hashes
        plan = ChunkPlan(size, self.chunk_size)
        self.journal.start(digest, size, plan.chunk_size)
        with open(path, "wb") as handle:
            handle.truncate(size)
        self._on_disk = [0] * plan.count
        return plan, {}

    @staticmethod
    def _length(plan: ChunkPlan, idx: int) -> int:
        start, end = plan.bounds(idx)
        return end - start

    def _discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.journal.forget(self.desc.digest)

    # -- hashing ---------------------------------------------------------------------------------

    def _hash_in_order(self, fd: int, plan: ChunkPlan, recorded: dict[int, str], pool: ThreadPoolExecutor,
                       futures: dict[int, Future[None]]) -> Digest:
        """Feed chunks to the blob's hash as each becomes complete, in order (one pass, overlapped)."""
        whole = hashlib.sha256()
        for idx in range(plan.count):
            length = self._length(plan, idx)
            while True:
                self._wait_for_chunk(idx, length)
                chunk_hash = self._hash_chunk(fd, plan, idx, whole_copy := whole.copy())
                if recorded.get(idx) in (None, chunk_hash.hexdigest()):
                    break
                # The bytes on disk changed since they were hashed (disk damage, tampering): fetch again.
                recorded.pop(idx)
                with self._cond:
                    self._on_disk[idx] = 0
                self.journal.record(self.desc.digest, idx, 0)
                futures[idx] = pool.submit(self._fetch_chunk_guarded, fd, plan, idx)
            whole = whole_copy
            if recorded.get(idx) is None:
                self.journal.record(self.desc.digest, idx, length, chunk_hash.hexdigest())
        return Digest(whole.hexdigest())

    def _hash_chunk(self, fd: int, plan: ChunkPlan, idx: int, whole: "hashlib._Hash") -> "hashlib._Hash":
        start, end = plan.bounds(idx)
        chunk_hash = hashlib.sha256()
        offset = start
        while offset < end:
            # Just written, so this reads from the page cache, not the disk.
            data = os.pread(fd, min(HASH_READ, end - offset), offset)
            if not data:
                raise BerthError(f"partial file of {self.desc.digest} is shorter than expected; pull again")
            chunk_hash.update(data)
            whole.update(data)
            offset += len(data)
        return chunk_hash

    def _wait_for_chunk(self, idx: int, length: int) -> None:
        with self._cond:
            while self._on_disk[idx] < length:
                if self._failure is not None:
                    raise self._failure
                if self.cancel.is_set():
                    raise PullCancelled("pull cancelled; run it again to resume")
                self._cond.wait(0.2)

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
        while True:
            with self._cond:
                done = self._on_disk[idx]
            if start + done >= end:
                return
            if self.cancel.is_set():
                raise PullCancelled("pull cancelled")
            before = done
            try:
                done = self._stream_range(fd, url, scope, idx, start, end, done)
            except (RegistryRefused, RegistryUnauthorized):
                raise  # retrying cannot help, and must not (a refusal is a security decision)
            except (httpx.TransportError, RegistryError) as exc:
                last_error = describe(exc) if isinstance(exc, httpx.TransportError) else str(exc)
                with self._cond:
                    done = self._on_disk[idx]
            self.journal.record(self.desc.digest, idx, done)
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

    def _stream_range(self, fd: int, url: str, scope: str, idx: int, start: int, end: int, done: int) -> int:
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
                self._copy_body(fd, response, idx, start, end, offset)
            finally:
                # Whatever landed is recorded even when the attempt dies, so a resume skips it.
                self.journal.record(self.desc.digest, idx, self._on_disk_of(idx))
        return self._on_disk_of(idx)

    def _on_disk_of(self, idx: int) -> int:
        with self._cond:
            return self._on_disk[idx]

    def _copy_body(self, fd: int, response: httpx.Response, idx: int, start: int, end: int, offset: int) -> None:
        unsaved = 0
        # Raw bytes: no content decoding, so a compressed body cannot expand (a gzip bomb is
        # just wrong bytes, caught by the digest).
        for data in response.iter_raw():
            if self.cancel.is_set():
                raise PullCancelled("pull cancelled")
            take = min(len(data), end - offset)
            if take <= 0:
                break
            os.pwrite(fd, memoryview(data)[:take], offset)
            offset += take
            unsaved += take
            with self._cond:
                self._on_disk[idx] = offset - start
                self.fetched += take
                self._cond.notify_all()
            if unsaved >= SAVE_EVERY:
                self.journal.record(self.desc.digest, idx, offset - start)
                unsaved = 0
            if offset >= end:
                break


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


class Puller:
    """Pulls models into a Library. Thread-safe; one per app."""

    def __init__(self, library: Library, client: RegistryClient, downloads: SharedDownloads | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, parallel: int = DEFAULT_PARALLEL) -> None:
        self.library = library
        self.client = client
        self.downloads = downloads or SharedDownloads()
        self.journal = DownloadJournal(library)
        self.chunk_size = chunk_size
        self.parallel = parallel

    def fetch_manifest(self, repo: Repository, reference: str) -> Manifest:
        headers = {"Accept": ", ".join(MANIFEST_TYPES)}
        try:
            response = self.client.request("GET", repo.manifest_url(reference), repo, repo.scope("pull"),
                                           headers=headers)
        except RegistryNotFound:
            raise RegistryNotFound("pull model manifest: file does not exist") from None
        served_digest = response.headers.get("docker-content-digest")
        raw = read_bounded(response, MAX_MANIFEST_BYTES, "manifest")
        manifest = Manifest.parse(raw)
        if served_digest and served_digest != str(manifest.digest):
            raise InvalidInput(f"the registry says the manifest is {served_digest} but its bytes hash to "
                               f"{manifest.digest}; refusing it")
        return manifest

    def pull(self, name: ModelName, emit: Emit, insecure: bool = False,
             cancel: threading.Event | None = None) -> PullResult:
        cancel = cancel or threading.Event()
        repo = Repository.of(name, insecure)
        emit(progress("pulling manifest"))
        manifest = self.fetch_manifest(repo, name.tag)
        fetched = 0
        with self.library.pinned([desc.digest for desc in manifest.blobs()]):
            for desc in manifest.blobs():
                fetched += self._ensure_blob(repo, desc, emit, cancel)
            # Each blob was hashed as it landed; this status is kept for clients that wait for it.
            emit(progress("verifying sha256 digest"))
            emit(progress("writing manifest"))
            self.library.tag(name, manifest)
        emit(progress("success"))
        return PullResult(manifest, fetched)

    def _ensure_blob(self, repo: Repository, desc: Descriptor, emit: Emit, cancel: threading.Event) -> int:
        status = f"pulling {desc.digest.short}"
        store = self.library.blobs
        if store.exists(desc.digest):
            size = store.size(desc.digest)
            emit(progress(status, desc.digest, size, size))
            return 0
        shared = self.downloads.join(desc.digest, lambda: BlobFetch(
            self.client, repo, desc, store, self.journal, self.chunk_size, self.parallel))
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
           "partial_path", "progress"]
