"""Pulling a model from an OCI registry: manifest, verified resumable blob downloads, then the tag.

Sequence and progress statuses follow Ollama (docs/ollama-compatibility.md, "Pull"): `pulling manifest`,
`pulling <12hex>` per blob (layers, then config), `verifying sha256 digest`, `writing manifest`,
`success`. Differences, on purpose:

* The manifest is asked for in both Docker v2 and OCI form, bounded to 4 MiB, kept byte for byte,
  and every digest in it is validated (`Manifest.parse`) before any path or URL is built from it.
* A missing blob is fetched over `Range` requests into `blobs/sha256-<hex>-partial` (not a blob
  name, so nothing can mistake it for a finished blob). It is cut into fixed-size chunks, the unit
  of resume: a stream claims a run of consecutive chunks and fetches it with one request, moved
  from the connection into the file with as few copies as it allows (registry/body.py). One
  stream starts; more are added, one at a time, while each raises the throughput (a far or
  per-connection-throttled registry gets up to `parallel`; a fast local one keeps one, which costs
  least CPU). One thread hashes the whole blob in order, following the bytes as they land, so the
  digest is known when the last byte lands (no second pass), and at each chunk's end the running
  digest is that chunk's check. Another makes the landed bytes durable (fdatasync) every few MiB
  and only then records them in the catalog (registry/catalog/downloads.py), so the catalog never
  claims a byte a crash could lose, and no stream waits on the disk. A killed pull resumes: the
  durable chunks are re-read once (rebuilding the sha256 and comparing each recorded check, a
  damaged chunk fetched again) and only the rest is fetched.
* A blob of at most 1 MiB (config, template, license, parameters) is fetched whole in one GET
  through the store's writer (`WholeBlobFetch`): no partial file or journal, so a pull's fixed cost
  is mostly the manifest and the tag.
* Rate caps (registry/rate.py) are token buckets shared by all chunk threads.
* A blob whose bytes do not match is deleted with its partial state and the pull fails; the tag is
  committed (one transaction, `Library.tag`) only after every blob is in the store, verified.
* Two pulls of the same blob in one server share one download (`SharedDownloads`, owned by the
  app); when the last one waiting gives up, the download stops and its partial file stays for later.
  Across processes on one store (two servers, or `berth` beside a server) the partial file's lock
  (flock) lets one download it; another waits, then finds the blob done or resumes the download.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import threading
import time
import zlib
from contextlib import closing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import httpx

from berth.registry.blobstore import BlobStore
from berth.registry.body import write_body
from berth.registry.catalog.downloads import DownloadJournal
from berth.registry.digest import Digest
from berth.registry.errors import BerthError, DigestMismatch, InvalidInput
from berth.registry.library import Library
from berth.registry.manifest import DOCKER_MANIFEST, MANIFEST_TYPES, MAX_MANIFEST_BYTES, Descriptor, Manifest
from berth.registry.names import ModelName
from berth.registry.oci import (RegistryClient, RegistryError, RegistryNotFound, RegistryRefused, RegistryUnauthorized,
                          Repository, describe, read_bounded)
from berth.registry.rate import RateLimiter
from berth.registry.signing import Signatures
from berth.registry.trust import TrustMode, TrustPolicy, UntrustedModel, decide

Event = dict[str, Any]
Emit = Callable[[Event], None]

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024  # the unit of resume and of the per-chunk checksum
DEFAULT_PARALLEL = 4  # the most streams one blob gets (see _ramp)
# A stream asks for this many consecutive chunks in one request until the throughput is known,
# then for as many as it moves in a RAMP_INTERVAL if that is more (see _run_chunks): fewer
# requests (and TLS handshakes, since a directly read connection is not reused) without losing
# resume precision.
RUN_CHUNKS = 8
# Streams are added one at a time, RAMP_INTERVAL apart, while each raises the throughput this much.
RAMP_INTERVAL = 0.5
RAMP_GAIN = 1.15
# Landed bytes are made durable (fdatasync) and recorded in the catalog whenever this many have
# landed since the last time, on a thread of their own: a kill loses at most about this much.
CHECKPOINT_BYTES = 16 * 1024 * 1024
READ_SIZE = 1024 * 1024
# A blob up to this size is fetched whole (WholeBlobFetch): no chunks, journal or partial file.
WHOLE_BLOB_BYTES = 1024 * 1024
HASH_READ = 4 * 1024 * 1024
PROGRESS_INTERVAL = 0.1
PARTIAL_SUFFIX = "-partial"
# A chunk's check: the sha256 of the blob's bytes from its start up to the chunk's end.
PREFIX_CHECK = "prefix-sha256:"


class BlobDigestMismatch(DigestMismatch):
    """A downloaded blob hashed to something else; its partial file is already gone."""

    def __init__(self, expected: Digest, actual: Digest, host: str) -> None:
        super().__init__(str(expected), str(actual))
        self.message = (f"digest mismatch, file must be downloaded again: want {expected}, got {actual} "
                        f"(blob from {host}; the bad download was discarded, nothing was tagged)")


class RangeIgnored(RegistryError):
    """A registry answered a ranged blob request with the whole blob (200): it cannot resume."""


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

    Per chunk, state moves forward only: bytes *landed* (written to the page cache, shown as
    progress and followed by the hasher), bytes *durable* (covered by an fdatasync; the only figure
    the catalog records, so a resume never trusts bytes a crash could have lost) and, once the
    hashed front has passed its end, the chunk's check. Stream threads claim runs of consecutive
    chunks (one request each), the hashing thread follows the bytes in order, and a checkpoint
    thread makes them durable in the background, so no stream ever waits on the disk.
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
        self._hashed_all = threading.Event()  # the hashing thread is done, whichever way
        self._read_view: memoryview | None = None  # the hashing thread's buffer where a chunk is not mapped
        self.total = desc.size
        self.fetched = 0  # bytes received from the network in this run (the resume figure)
        self._cond = threading.Condition()
        self._landed: list[int] = []
        self._durable: list[int] = []
        self._claimed: list[bool] = []
        # Chunk checks known in this run and not yet in the catalog (see _record_check).
        self._checksums: dict[int, str] = {}
        self._unsynced = 0
        self._unlanded = desc.size  # bytes not landed yet (less on a resume: see _prepare)
        self._hashing = -1  # the chunk the hasher waits on: only its writer needs to wake it
        self._streams = 0  # streams running (the ramp adds them)
        self._first_byte: float | None = None  # when the first byte of this run landed (monotonic)
        # The blob's sha256, fed in order through whole chunks (by the hashing thread only).
        self._whole = hashlib.sha256()
        self._failure: BaseException | None = None
        self._sync_failed = False  # an fdatasync or journal write failed (see run)
        self._stopping = False
        # Serialises checkpoints, so an older snapshot can never overwrite a newer one in the catalog.
        self._checkpoint_lock = threading.Lock()

    @property
    def completed(self) -> int:
        with self._cond:
            return sum(self._landed)

    def run(self) -> None:
        digest = self.desc.digest
        path = partial_path(self.store, digest)
        fd = self._open_locked(path)
        if fd is None:
            return  # another process's download of it finished while this one waited
        try:
            plan, recorded, fresh = self._prepare(fd)
        except BaseException:
            os.close(fd)
            raise
        checkpointer = threading.Thread(target=self._checkpoint_loop, args=(fd, plan if fresh else None),
                                        daemon=True, name=f"pull-sync-{digest.short}")
        checkpointer.start()
        try:
            actual = self._download(fd, plan, recorded)
            self._stop_checkpoints(checkpointer)
            if self._sync_failed:
                # The hash finished before the failed checkpoint was seen: the bytes hashed from
                # the page cache may never reach the disk, and a later fsync would not say so.
                raise self._failure or BerthError(f"saving the download of {digest} failed")
        except BaseException as exc:
            try:
                self._stop_checkpoints(checkpointer)
                if isinstance(exc, RangeIgnored):
                    self._discard(path)  # the next pull starts from byte 0, the only start it has
                elif not self._sync_failed:
                    # What landed is made durable and recorded, so a resume skips it. Not after a
                    # failed fdatasync: Linux reports a writeback error once, so a second one would
                    # "succeed" and record bytes the disk lost.
                    self._checkpoint(fd)
            finally:
                os.close(fd)  # after any discard: the lock keeps other processes off the file until then
            raise
        if actual != digest:
            try:
                self._discard(path)
            finally:
                os.close(fd)
            raise BlobDigestMismatch(digest, actual, self.repo.host)
        try:
            os.fsync(fd)  # the checkpoints already flushed most of it
            os.fchmod(fd, 0o644)
            os.replace(path, self.store.path(digest))  # still locked: a waiting process sees it gone
        finally:
            os.close(fd)
        self.store.sync_dir()
        self.journal.forget(digest)

    def _download(self, fd: int, plan: ChunkPlan, recorded: dict[int, str]) -> Digest:
        # One stream to start; _ramp adds more while each one added raises the throughput.
        with ThreadPoolExecutor(max_workers=self.parallel + 2, thread_name_prefix="pull-stream") as pool:
            pool.submit(self._stream_guarded, fd, plan)
            if self.parallel > 1:
                pool.submit(self._ramp, fd, plan, pool)
            try:
                return self._hash_in_order(fd, plan, recorded, pool)
            except BaseException:
                self.cancel.set()  # stop the streams; what landed is checkpointed by run()
                raise
            finally:
                self._hashed_all.set()  # the ramp stops waiting, so the pool closes at once

    def _ramp(self, fd: int, plan: ChunkPlan, pool: ThreadPoolExecutor) -> None:
        """Add a stream every RAMP_INTERVAL while the last one added raised the throughput by
        RAMP_GAIN, up to `parallel`. A far or per-connection-throttled registry gets them all; on a
        fast link extra streams only cost CPU, ours and the registry's (from a local registry on
        two cores, one stream was measured ~25% faster than four)."""
        # The first stream's rate counts from its first byte: its connection set-up would make
        # the next stream look like a gain.
        while not self.fetched:
            if self._hashed_all.wait(0.01):
                return
        streams, rate = 1, self._rate_over(plan, RAMP_INTERVAL)
        while streams < self.parallel and rate is not None:
            pool.submit(self._stream_guarded, fd, plan)
            streams += 1
            faster = self._rate_over(plan, RAMP_INTERVAL)
            if faster is None or faster < rate * RAMP_GAIN:
                return
            rate = faster

    def _rate_over(self, plan: ChunkPlan, seconds: float) -> float | None:
        """Bytes/s received in the next `seconds`; None once nothing is left to claim (or it stopped)."""
        with self._cond:
            before, started = self.fetched, time.monotonic()
        if self._hashed_all.wait(seconds):
            return None
        with self._cond:
            if self._failure is not None or not any(self._unclaimed(plan, i) for i in range(plan.count)):
                return None
            return (self.fetched - before) / max(time.monotonic() - started, 1e-6)

    # -- preparation ----------------------------------------------------------------------------

    def _open_locked(self, path: Path) -> int | None:
        """The partial file, opened (created if new) and locked, so that one process at a time
        downloads a blob into a store (two servers, or `berth` beside a server, on one store): a
        download another process is making is waited for, then resumed or found finished (None)."""
        while True:
            if self.store.exists(self.desc.digest):
                return None
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if self.cancel.wait(PROGRESS_INTERVAL):
                            raise PullCancelled("pull cancelled; run it again to resume") from None
                try:
                    still_there = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    still_there = False
            except BaseException:
                os.close(fd)
                raise
            if still_there:
                return fd
            os.close(fd)  # the file waited on was published or discarded meanwhile: look again

    def _prepare(self, fd: int) -> tuple[ChunkPlan, dict[int, str], bool]:
        """Resume from recorded state when it still fits the file on disk; else start afresh (True:
        the checkpoint thread records the start, so the first request need not wait for the catalog)."""
        digest, size = self.desc.digest, self.desc.size
        # A file of another size (a new one is empty) cannot be resumed: the catalog is not read.
        state = self.journal.load(digest) if os.fstat(fd).st_size == size else None
        if state is not None and state.size == size:
            plan = ChunkPlan(size, state.chunk_size)
            self._landed = [min(state.chunks[i].completed, self._length(plan, i)) if i in state.chunks else 0
                            for i in range(plan.count)]
            recorded = {i: c.checksum for i, c in state.chunks.items() if c.checksum}
        else:
            plan = ChunkPlan(size, self.chunk_size)
            os.ftruncate(fd, 0)  # nothing of an unrecorded file is trusted
            os.ftruncate(fd, size)
            self._landed = [0] * plan.count
            recorded = {}
        self._durable = list(self._landed)
        self._claimed = [False] * plan.count
        self._unlanded = size - sum(self._landed)
        return plan, recorded, state is None

    @staticmethod
    def _length(plan: ChunkPlan, idx: int) -> int:
        start, end = plan.bounds(idx)
        return end - start

    def _discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.journal.forget(self.desc.digest)

    # -- durability --------------------------------------------------------------------------------

    def _checkpoint_loop(self, fd: int, fresh: ChunkPlan | None) -> None:
        """Record a fresh download's start (first, whatever happens: run() joins this thread before
        it forgets the download), then make landed bytes durable every CHECKPOINT_BYTES, off the
        streams' threads."""
        try:
            if fresh is not None:
                self.journal.start(self.desc.digest, fresh.size, fresh.chunk_size)
            while True:
                with self._cond:
                    while not self._sync_due() and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        return
                self._checkpoint(fd)
        except Exception as exc:  # noqa: BLE001 - a full or failing disk or catalog: the pull cannot go on
            with self._cond:
                self._sync_failed = True
                if self._failure is None:
                    self._failure = BerthError(f"saving the download of {self.desc.digest} failed: {exc}")
                self._cond.notify_all()

    def _sync_due(self) -> bool:
        """Under _cond: a checkpoint is due, every CHECKPOINT_BYTES landed, and at once when the
        last byte has landed (the disk works while the hasher finishes, and the final fsync finds
        little to do)."""
        return self._unsynced >= CHECKPOINT_BYTES or (self._unsynced > 0 and not self._unlanded)

    def _stop_checkpoints(self, checkpointer: threading.Thread) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        checkpointer.join()

    def _checkpoint(self, fd: int) -> None:
        """fdatasync what has landed, then (and only then) record it in the catalog."""
        with self._checkpoint_lock:
            with self._cond:
                landed = list(self._landed)
                checksums = dict(self._checksums)
                self._unsynced = 0
            # A chunk is recorded when more of it landed, or when its check became known (the
            # hashed front can pass a chunk long after its bytes landed and were recorded).
            changed = {idx: (count, checksums.get(idx)) for idx, count in enumerate(landed)
                       if count > self._durable[idx] or idx in checksums}
            if not changed:
                return
            os.fdatasync(fd)
            with self._cond:
                for idx, (count, check) in changed.items():
                    self._durable[idx] = max(self._durable[idx], count)
                    if check is not None and self._checksums.get(idx) == check:
                        del self._checksums[idx]
            self.journal.record(self.desc.digest, changed)

    def _restart_chunk(self, idx: int) -> None:
        """Forget a chunk whose bytes on disk no longer match its recorded checksum."""
        with self._checkpoint_lock:
            with self._cond:
                self._unlanded += self._landed[idx]
                self._landed[idx] = self._durable[idx] = 0
                self._claimed[idx] = False
                self._checksums.pop(idx, None)
            self.journal.reset(self.desc.digest, idx)

    # -- hashing ---------------------------------------------------------------------------------

    def _hash_in_order(self, fd: int, plan: ChunkPlan, recorded: dict[int, str], pool: ThreadPoolExecutor) -> Digest:
        """Feed the blob's sha256 in order as the bytes land (one pass, overlapped with the download).

        The bytes are read back from the page cache: on two cores, hashing here while the streams
        receive was measured faster than hashing on a stream's thread from memory (no copy, but
        the stream stops receiving meanwhile). Chunks an earlier run recorded are checked here."""
        for idx in range(plan.count):
            while idx in recorded:
                expected = recorded.pop(idx)
                candidate = self._whole.copy()
                # A recorded chunk has landed whole and no stream claims it: the front stays at its start.
                if expected.startswith(PREFIX_CHECK):
                    self._hash_range(fd, plan, idx, (candidate,))
                    matches = expected == PREFIX_CHECK + candidate.copy().hexdigest()
                else:
                    legacy = ChunkCheck.of(expected)
                    self._hash_range(fd, plan, idx, (legacy, candidate))
                    matches = legacy.matches()
                if matches:
                    self._whole = candidate
                    break
                # The bytes on disk changed since they were checked (disk damage, tampering): fetch again.
                self._restart_chunk(idx)
                pool.submit(self._stream_guarded, fd, plan)
            else:
                self._hash_range(fd, plan, idx, (self._whole,))
                self._record_check(idx)
        return Digest(self._whole.hexdigest())

    def _hash_range(self, fd: int, plan: ChunkPlan, idx: int, hashes: tuple["Hasher", ...]) -> None:
        """Feed chunk `idx` to `hashes` as its bytes land. They are hashed where they lie in the page
        cache, through a mapping of the chunk: reading them into a buffer first cost a fifth more
        CPU, which on a fast link is what a pull is short of. The partial file's lock keeps any
        other pull from truncating it meanwhile (reading a mapping past the end would be SIGBUS)."""
        start, end = plan.bounds(idx)
        window = None
        if start % mmap.ALLOCATIONGRANULARITY == 0:
            try:
                window = mmap.mmap(fd, end - start, offset=start, prot=mmap.PROT_READ)
            except OSError:
                pass  # a file system without shared mappings: read into a buffer instead
        if window is None:
            offset = start
            while offset < end:
                offset = self._read_into(fd, offset, start + self._wait_for_bytes(idx, offset - start), hashes)
            return
        with window, memoryview(window) as view:
            hashed = 0
            while hashed < end - start:
                landed = self._wait_for_bytes(idx, hashed)
                for running in hashes:
                    running.update(view[hashed:landed])
                hashed = landed

    def _read_into(self, fd: int, offset: int, end: int, hashes: tuple["Hasher", ...]) -> int:
        if self._read_view is None:
            self._read_view = memoryview(bytearray(min(HASH_READ, max(self.total, 1))))
        view = self._read_view
        while offset < end:
            # Just written, so this reads from the page cache, not the disk; sha256 releases
            # the GIL on large updates, so this thread hashes while the streams download. One
            # buffer, reused: a fresh one per read costs its page faults every time.
            count = os.preadv(fd, [view[:min(HASH_READ, end - offset)]], offset)
            if not count:
                raise BerthError(f"partial file of {self.desc.digest} is shorter than expected; pull again")
            for running in hashes:
                running.update(view[:count])
            offset += count
        return offset

    def _record_check(self, idx: int) -> None:
        """The sha256 has been fed through chunk `idx`: its check is the digest of the blob's bytes
        up to there, known for free (no second hash of the bytes); a resume, which rebuilds the same
        running sha256 from the file, compares it as it goes."""
        check = PREFIX_CHECK + self._whole.copy().hexdigest()
        with self._cond:
            self._checksums[idx] = check

    def _wait_for_bytes(self, idx: int, hashed: int) -> int:
        """Block until chunk `idx` has more than `hashed` bytes landed; return how many it has."""
        with self._cond:
            self._hashing = idx
            # Checked on every call, not only when waiting: a resume re-reads what is on disk
            # (gigabytes, maybe) without waiting, and a cancel or a failed stream must stop it.
            while True:
                if self._failure is not None:
                    raise self._failure
                if self.cancel.is_set():
                    raise PullCancelled("pull cancelled; run it again to resume")
                if self._landed[idx] > hashed:
                    return self._landed[idx]
                self._cond.wait(0.2)

    # -- fetching --------------------------------------------------------------------------------

    def _stream_guarded(self, fd: int, plan: ChunkPlan) -> None:
        """One stream: claims runs of chunks and fetches each with one request, until none is left."""
        with self._cond:
            self._streams += 1
        try:
            while (run := self._claim(plan)) is not None:
                self._fetch_run(fd, plan, *run)
        except BaseException as exc:  # noqa: BLE001 - handed to the hashing thread, which raises it
            with self._cond:
                if self._failure is None and not isinstance(exc, PullCancelled):
                    self._failure = exc
                self._cond.notify_all()
        finally:
            with self._cond:
                self._streams -= 1

    def _claim(self, plan: ChunkPlan) -> tuple[int, int] | None:
        """Claim the first unfinished chunks, [first, stop): at most `_run_chunks`, and few enough
        that every running stream gets a share of what is left (so all of them stay busy to the
        end). A lone stream takes whole runs: each request is a new connection, which costs on a
        fast link."""
        with self._cond:
            pending = [i for i in range(plan.count) if self._unclaimed(plan, i)]
            if not pending:
                return None
            share = max(1, min(self._run_chunks(plan), -(-len(pending) // max(1, self._streams))))
            first = pending[0]
            self._claimed[first] = True
            return first, self._claim_following(plan, first + 1, first + share)

    def _claim_following(self, plan: ChunkPlan, stop: int, limit: int | None = None) -> int:
        """Claim the chunks from `stop` on (up to `limit`) while each is unclaimed and has nothing on
        disk; the run's new stop. A run is one range from its first chunk's first missing byte: a
        later chunk partly on disk (a resume) starts a run of its own rather than being fetched
        again. Without `limit`, as far as that goes (a whole-blob answer brings every chunk)."""
        end = plan.count if limit is None else min(limit, plan.count)
        with self._cond:
            while stop < end and self._unclaimed(plan, stop) and not self._landed[stop]:
                self._claimed[stop] = True
                stop += 1
            return stop

    def _run_chunks(self, plan: ChunkPlan) -> int:
        """Under _cond: the most chunks one request asks for. Each request waits for the registry's
        first byte (3-4 ms from a local docker-registry, more from afar), which a fast link feels:
        once the throughput is known, a stream asks for what it moves in a RAMP_INTERVAL (the rest
        of a blob, at loopback speed). A run still ends within a ramp step or so, leaving chunks
        for the streams the ramp adds on a slower link."""
        # No estimate before a run's worth has come in: a resume's first run can be one piece,
        # landed within microseconds of its first byte, which would read as any rate at all.
        if self._first_byte is None or self.fetched < RUN_CHUNKS * plan.chunk_size:
            return RUN_CHUNKS
        elapsed = time.monotonic() - self._first_byte
        if elapsed <= 0.0:
            return RUN_CHUNKS
        per_stream = self.fetched / elapsed / max(1, self._streams)
        return max(RUN_CHUNKS, int(per_stream * RAMP_INTERVAL) // plan.chunk_size)

    def _unclaimed(self, plan: ChunkPlan, idx: int) -> bool:
        """Under _cond: chunk `idx` still has bytes to fetch and no stream has claimed it."""
        return not self._claimed[idx] and self._landed[idx] < self._length(plan, idx)

    def _fetch_run(self, fd: int, plan: ChunkPlan, first: int, stop: int) -> None:
        def whole_blob() -> int:
            """The registry sent the whole blob for a range from byte 0: take it all."""
            nonlocal stop
            stop = self._claim_following(plan, stop)
            return plan.bounds(stop - 1)[1]

        url = self.repo.blob_url(self.desc.digest)
        scope = self.repo.scope("pull")
        buffer = bytearray(READ_SIZE)  # received into directly, reused for the whole run
        failures = 0
        last_error = ""
        while True:
            offset, end = self._resume_point(plan, first, stop), plan.bounds(stop - 1)[1]
            if offset >= end:
                return
            if self.cancel.is_set():
                raise PullCancelled("pull cancelled")
            try:
                self._stream_range(fd, plan, url, scope, offset, end, buffer, whole_blob)
            except (RegistryRefused, RegistryUnauthorized, RangeIgnored):
                raise  # retrying cannot help, and must not (a refusal is a security decision)
            except (httpx.TransportError, RegistryError) as exc:
                last_error = describe(exc) if isinstance(exc, httpx.TransportError) else str(exc)
            reached = self._resume_point(plan, first, stop)
            if reached >= plan.bounds(stop - 1)[1]:
                return
            # A connection that delivered bytes before dropping is not a failure: resume at once.
            failures = 0 if reached > offset else failures + 1
            if failures >= self.client.retry.attempts:
                raise RegistryError(
                    f"downloading {self.desc.digest} from {self.repo.host} stopped at byte {reached} of "
                    f"{self.total} after {failures} attempts without progress ({last_error or 'body ended early'});"
                    " run the pull again to resume from there")
            time.sleep(self.client.retry.backoff(failures - 1) if failures else 0)

    def _resume_point(self, plan: ChunkPlan, first: int, stop: int) -> int:
        """The first byte of chunks [first, stop) not landed yet (they land in order)."""
        with self._cond:
            for idx in range(first, stop):
                if self._landed[idx] < self._length(plan, idx):
                    return plan.bounds(idx)[0] + self._landed[idx]
        return plan.bounds(stop - 1)[1]

    def _stream_range(self, fd: int, plan: ChunkPlan, url: str, scope: str, offset: int, end: int,
                      buffer: bytearray, whole_blob: Callable[[], int]) -> None:
        headers = {"Range": f"bytes={offset}-{end - 1}", "Accept-Encoding": "identity"}
        with self.client.stream("GET", url, self.repo, scope, headers=headers, ok=(200, 206)) as response:
            if response.status_code == 200 and offset != 0:
                raise RangeIgnored(
                    f"{self.repo.host} ignored the Range header for {self.desc.digest}, so the download cannot "
                    f"go on from byte {offset}; the partial download was discarded: run the pull again to "
                    "fetch the blob from its start")
            if response.status_code == 200 and end < self.total:
                end = whole_blob()  # a registry without ranges: one stream takes the whole body
            if response.status_code == 206:
                served = response.headers.get("content-range", "")
                if not served.startswith(f"bytes {offset}-"):
                    raise RegistryError(f"{self.repo.host} answered range {served!r} for bytes={offset}-")
            # Raw bytes: no content decoding, so a compressed body cannot expand (a gzip bomb is
            # just wrong bytes, caught by the digest).
            with closing(write_body(response, fd, offset, end - offset, self.client.timeouts.read,
                                    buffer)) as pieces:
                for count in pieces:
                    offset = self._land(plan, offset, count)
                    if self.cancel.is_set():
                        raise PullCancelled("pull cancelled")

    def _land(self, plan: ChunkPlan, offset: int, count: int) -> int:
        """Publish `count` bytes written at `offset` as landed and pay the rate caps; new offset."""
        position, stop = offset, offset + count
        wake = False
        while position < stop:
            idx = position // plan.chunk_size
            start, chunk_end = plan.bounds(idx)
            upto = min(chunk_end, stop)
            with self._cond:
                self._landed[idx] = upto - start
                wake = wake or self._hashing == idx
            position = upto
        with self._cond:
            if self._first_byte is None:
                self._first_byte = time.monotonic()
            self.fetched += count
            self._unsynced += count
            self._unlanded -= count
            if wake or self._sync_due():
                self._cond.notify_all()
        for limiter in self.limiters:
            limiter.consume(count, self.cancel.is_set)
        return stop


class WholeBlobFetch:
    """A blob of at most WHOLE_BLOB_BYTES (a config, template, license or parameters): one GET
    through the store's writer (a locked temporary file, hashed as written, fsynced, renamed), with
    no partial file, journal or threads of its own. Such a blob costs less to fetch again than its
    resume records would cost to keep; a pull is mostly these plus one large blob."""

    def __init__(self, client: RegistryClient, repo: Repository, desc: Descriptor, store: BlobStore,
                 limiters: tuple[RateLimiter, ...] = ()) -> None:
        self.client = client
        self.repo = repo
        self.desc = desc
        self.store = store
        self.limiters = limiters
        self.cancel = threading.Event()
        self.total = desc.size
        self.fetched = 0  # bytes received in this run, retries included
        self.completed = 0  # bytes of the current attempt (the progress figure)

    def run(self) -> None:
        attempts, last_error = self.client.retry.attempts, ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.client.retry.backoff(attempt - 1))
            try:
                return self._fetch()
            except (httpx.TransportError, _EndedEarly) as exc:
                last_error = describe(exc) if isinstance(exc, httpx.TransportError) else str(exc)
        raise RegistryError(f"downloading {self.desc.digest} from {self.repo.host} failed {attempts} times "
                            f"({last_error}); run the pull again")

    def _fetch(self) -> None:
        digest = self.desc.digest
        headers = {"Accept-Encoding": "identity"}  # raw bytes: a compressed body cannot expand
        with self.store.writer(digest, max_size=self.total) as writer:
            with self.client.stream("GET", self.repo.blob_url(digest), self.repo, self.repo.scope("pull"),
                                    headers=headers) as response:
                self.completed = 0
                for data in response.iter_raw():
                    if self.cancel.is_set():
                        raise PullCancelled("pull cancelled")
                    writer.write(data)  # TooLarge past the manifest's size: a registry sending more
                    self.fetched += len(data)
                    self.completed += len(data)
                    for limiter in self.limiters:
                        limiter.consume(len(data), self.cancel.is_set)
            if writer.size != self.total:
                raise _EndedEarly(f"the body ended after {writer.size} of {self.total} bytes")
            try:
                writer.commit()
            except DigestMismatch as exc:
                raise BlobDigestMismatch(digest, Digest.parse(exc.actual), self.repo.host) from None


class _EndedEarly(Exception):
    pass


class Fetch(Protocol):
    """What SharedDownloads runs and pulls follow: BlobFetch or WholeBlobFetch."""

    cancel: threading.Event
    fetched: int

    @property
    def completed(self) -> int: ...

    def run(self) -> None: ...


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


@dataclass
class ChunkCheck:
    """Recomputes a check of the chunk alone that an earlier version recorded ("crc32:<8hex>", "sha256:<hex>")."""

    expected: str
    algorithm: str
    crc: int = 0
    sha: "hashlib._Hash | None" = None

    @classmethod
    def of(cls, recorded: str) -> "ChunkCheck":
        algorithm, _, _ = recorded.partition(":")
        return cls(recorded, algorithm, sha=hashlib.sha256() if algorithm == "sha256" else None)

    def update(self, data: bytes, /) -> None:
        if self.sha is not None:
            self.sha.update(data)
        else:
            self.crc = zlib.crc32(data, self.crc)

    def matches(self) -> bool:
        if self.algorithm == "crc32":
            return self.expected == f"crc32:{self.crc:08x}"
        if self.sha is not None:
            return self.expected == f"sha256:{self.sha.hexdigest()}"
        return False  # a checksum this version does not know: fetch the chunk again


@dataclass
class _Shared:
    fetch: Fetch
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    waiters: int = 0


class SharedDownloads:
    """Blob downloads in flight in this process, by digest. The app owns one (no module state)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[Digest, _Shared] = {}

    def join(self, digest: Digest, make: Callable[[], Fetch], cancel: threading.Event | None = None) -> _Shared:
        """The download of `digest` in flight, joined, or a new one. `cancel` stops the wait for a
        download that is being stopped."""
        while True:
            with self._lock:
                shared = self._active.get(digest)
                if shared is None:
                    shared = _Shared(make())
                    self._active[digest] = shared
                    threading.Thread(target=self._run, args=(digest, shared), name=f"pull-{digest.short}",
                                     daemon=True).start()
                if not shared.fetch.cancel.is_set():
                    shared.waiters += 1
                    return shared
            # A download being stopped (its last waiter left, or it failed) would only hand this pull
            # its cancel: wait until it has let go of the partial file, then resume from that file.
            while not shared.done.wait(PROGRESS_INTERVAL):
                if cancel is not None and cancel.is_set():
                    raise PullCancelled("pull cancelled; run it again to resume")
            if shared.error is None:
                # It finished after all (a cancel that comes during the final sync and rename
                # stops nothing): the blob is in the store.
                with self._lock:
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
        with self.library.pinned([desc.digest for desc in manifest.blobs()]):
            fetched = self._ensure_blobs(repo, manifest.blobs(), emit, cancel, limiters)
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

    def _ensure_blobs(self, repo: Repository, blobs: list[Descriptor], emit: Emit, cancel: threading.Event,
                      limiters: tuple[RateLimiter, ...] = ()) -> int:
        """Fetch every missing blob at once (small ones finish while the weights stream) and report
        each one's progress as Ollama does, `pulling <12hex>` with total and completed; bytes fetched."""
        store = self.library.blobs
        waiting: dict[Digest, tuple[Descriptor, _Shared]] = {}
        try:
            # The largest starts first: the small ones' set-up would otherwise delay its first byte.
            for desc in sorted(blobs, key=lambda d: -d.size):
                if desc.digest not in waiting and not store.exists(desc.digest):
                    waiting[desc.digest] = desc, self.downloads.join(
                        desc.digest, lambda desc=desc: self._fetch_of(repo, desc, limiters), cancel)
            for desc in blobs:
                if desc.digest in waiting:
                    emit(progress(f"pulling {desc.digest.short}", desc.digest, desc.size, 0))
                else:
                    size = store.size(desc.digest)
                    emit(progress(f"pulling {desc.digest.short}", desc.digest, size, size))
            return self._follow(waiting, emit, cancel)
        finally:
            for _, shared in waiting.values():
                self.downloads.leave(shared)

    def _fetch_of(self, repo: Repository, desc: Descriptor, limiters: tuple[RateLimiter, ...]) -> Fetch:
        store = self.library.blobs
        if desc.size <= WHOLE_BLOB_BYTES and not partial_path(store, desc.digest).exists():
            return WholeBlobFetch(self.client, repo, desc, store, limiters)
        # Large, or small with a partial file an earlier version left: resumed (and then cleared).
        return BlobFetch(self.client, repo, desc, store, self.journal, self.chunk_size, self.parallel, limiters)

    @staticmethod
    def _follow(waiting: dict[Digest, tuple[Descriptor, _Shared]], emit: Emit, cancel: threading.Event) -> int:
        """Report progress until every blob is in; the first failure (of any blob) ends the pull."""
        reported: dict[Digest, int] = {}
        pending = list(waiting.values())
        fetched = 0
        while pending:
            pending[0][1].done.wait(PROGRESS_INTERVAL)
            if cancel.is_set():
                raise PullCancelled("pull cancelled; run it again to resume")
            for desc, shared in list(pending):
                if shared.done.is_set():
                    if shared.error is not None:
                        raise shared.error
                    emit(progress(f"pulling {desc.digest.short}", desc.digest, desc.size, desc.size))
                    fetched += shared.fetch.fetched
                    pending.remove((desc, shared))
                    continue
                completed = shared.fetch.completed
                if completed != reported.get(desc.digest, 0):
                    emit(progress(f"pulling {desc.digest.short}", desc.digest, desc.size, completed))
                    reported[desc.digest] = completed
        return fetched


__all__ = ["BlobFetch", "DOCKER_MANIFEST", "PullCancelled", "PullResult", "Puller", "SharedDownloads",
           "WholeBlobFetch", "fetch_manifest", "partial_path", "progress"]
