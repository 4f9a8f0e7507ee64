"""The scheduler: which models are loaded, for how long, and who waits for what.

- A request for a loaded model with the same load-time options attaches at once.
- Anything that waits for another request's load waits in a bounded queue (`BERTH_MAX_QUEUE`);
  past that, 503.
- Loads happen one at a time, in arrival order. With `BERTH_MAX_LOADED_MODELS` runners up, the
  idle one whose keep-alive ends first is unloaded; if all are busy, the load waits for one.
- After its last request a model stays for `keep_alive` (0: unload at once; negative: forever).
- A runner serves as many requests at once as it has slots (`BERTH_NUM_PARALLEL`, else chosen
  by hardware); the rest wait for a slot, in the same bounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

from berth.registry.digest import Digest
from berth.registry.errors import BerthError
from berth.registry.names import ModelName
from berth.server.metrics import Metrics
from berth.server.runner.protocol import LoadSpec
from berth.server.runner.client import RunnerProcess

log = logging.getLogger("berth.scheduler")

QUEUE_FULL_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
# Python's datetime cannot reach Go's ~292-year "forever"; 200 years reads the same in any client.
FOREVER_DELTA = timedelta(days=365 * 200)


class QueueFull(BerthError):
    def __init__(self) -> None:
        super().__init__(QUEUE_FULL_MESSAGE)


@dataclass(frozen=True)
class ModelRef:
    """What to load: a model's manifest digest, its display name and the runner to start."""

    name: ModelName
    digest: Digest
    spec: LoadSpec
    details: dict[str, Any]
    size: int


@dataclass
class Loaded:
    ref: ModelRef
    runner: RunnerProcess
    slots: asyncio.Semaphore
    keep_alive: float
    load_duration_ns: int
    refcount: int = 0
    expires_at: float | None = None  # monotonic deadline while idle
    timer: asyncio.TimerHandle | None = None
    expiry_wall: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def context_length(self) -> int:
        return int(self.runner.info.get("n_ctx", self.ref.spec.num_ctx))


class Lease:
    """A request's hold on a loaded model: keeps it loaded, and holds one slot while used."""

    def __init__(self, scheduler: "Scheduler", loaded: Loaded, load_duration_ns: int) -> None:
        self.scheduler = scheduler
        self.loaded = loaded
        self.load_duration_ns = load_duration_ns
        self._released = False

    @property
    def runner(self) -> RunnerProcess:
        return self.loaded.runner

    async def __aenter__(self) -> "Lease":
        """Take a slot; when all are busy, wait for one in the scheduler's bounded queue."""
        slots = self.loaded.slots
        try:
            if slots.locked():
                with self.scheduler.queue_place():
                    await slots.acquire()
            else:
                await slots.acquire()
        except BaseException:
            self.release()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.loaded.slots.release()
        self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.scheduler._release(self.loaded)


class Scheduler:
    def __init__(self, *, max_loaded: int, num_parallel: int, max_queue: int, default_keep_alive: float,
                 load_timeout: float, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.max_loaded = max(1, max_loaded)
        self.num_parallel = max(1, num_parallel)
        self.max_queue = max(0, max_queue)
        self.default_keep_alive = default_keep_alive
        self.load_timeout = load_timeout
        self._loaded: dict[Digest, Loaded] = {}
        self._queued = 0  # requests waiting for a model to load or for a loaded model's slot
        self._load_lock = asyncio.Lock()
        self._loading = 0  # requests loading a model or waiting for the load lock
        self._changed = asyncio.Condition()

    # -- acquiring ------------------------------------------------------------------------------

    async def acquire(self, ref: ModelRef, keep_alive: float | None) -> Lease:
        """Get the model loaded (loading it if needed) and hold it. Raises QueueFull or RunnerError."""
        lease = self._attach(ref, keep_alive)
        if lease is not None:
            return lease
        # A place in the queue is for waiting behind another request's load; the request that
        # loads is being served (so BERTH_MAX_QUEUE=0 means "no waiting", not "no loads").
        with self.queue_place() if self._loading else contextlib.nullcontext():
            self._loading += 1
            try:
                async with self._load_lock:
                    lease = self._attach(ref, keep_alive)
                    if lease is not None:
                        return lease
                    started = time.perf_counter_ns()
                    await self._make_room(ref)
                    loaded = await self._load(ref, keep_alive)
                    loaded.refcount += 1
                    return Lease(self, loaded, time.perf_counter_ns() - started)
            finally:
                self._loading -= 1

    @contextlib.contextmanager
    def queue_place(self) -> Iterator[None]:
        """A place among the requests waiting for a load or for a slot, which BERTH_MAX_QUEUE bounds
        together (Ollama lets slot waiters pile up without limit: ollama#7758); QueueFull if none."""
        if self._queued >= self.max_queue:
            raise QueueFull()
        self._queued += 1
        self.metrics.queue_depth.set(self._queued)
        try:
            yield
        finally:
            self._queued -= 1
            self.metrics.queue_depth.set(self._queued)

    def _attach(self, ref: ModelRef, keep_alive: float | None) -> Lease | None:
        loaded = self._loaded.get(ref.digest)
        if loaded is None or not loaded.runner.alive or loaded.ref.spec != ref.spec:
            return None
        loaded.refcount += 1
        self._cancel_timer(loaded)
        if keep_alive is not None:
            loaded.keep_alive = keep_alive
        return Lease(self, loaded, 0)

    async def _make_room(self, ref: ModelRef) -> None:
        """Unload a stale runner of this model, then idle ones until there is room for one more."""
        current = self._loaded.get(ref.digest)
        if current is not None:
            # Different load-time options, or a dead runner: let its requests finish, then replace it.
            await self._wait_until(lambda: current.refcount == 0 or not current.runner.alive)
            await self._unload(current)
        while len(self._loaded) >= self.max_loaded:
            idle = [m for m in self._loaded.values() if m.refcount == 0]
            if idle:
                victim = min(idle, key=lambda m: (m.expires_at if m.expires_at is not None else math.inf,
                                                  str(m.ref.name)))
                await self._unload(victim)
            else:
                # Room also comes from a busy model leaving by itself (keep_alive 0, a dead runner):
                # its unload removes it before anyone sees it idle.
                await self._wait_until(lambda: len(self._loaded) < self.max_loaded
                                       or any(m.refcount == 0 for m in self._loaded.values()))

    async def _load(self, ref: ModelRef, keep_alive: float | None) -> Loaded:
        runner = RunnerProcess(ref.spec, ref.name.display)
        started = time.perf_counter_ns()
        log.info("loading %s (num_ctx=%d, num_gpu=%d)", ref.name.display, ref.spec.num_ctx, ref.spec.num_gpu)
        await asyncio.to_thread(runner.start, self.load_timeout)
        elapsed = time.perf_counter_ns() - started
        log.info("loaded %s in %.2fs (pid %s, gpu layers %s, %s slot(s))", ref.name.display, elapsed / 1e9,
                 runner.pid, runner.info.get("n_gpu_layers"), runner.info.get("slots", self.num_parallel))
        # The runner says how many generations it serves at once (its batch slots, chosen by hardware
        # unless BERTH_NUM_PARALLEL fixed them); that many requests hold a slot, the rest queue.
        slots = int(runner.info.get("slots") or self.num_parallel)
        loaded = Loaded(ref=ref, runner=runner, slots=asyncio.Semaphore(slots),
                        keep_alive=self.default_keep_alive if keep_alive is None else keep_alive,
                        load_duration_ns=elapsed)
        self._loaded[ref.digest] = loaded
        self.metrics.load_seconds.labels(ref.name.display).observe(elapsed / 1e9)
        self.metrics.loaded_models.set(len(self._loaded))
        return loaded

    async def _wait_until(self, predicate: Any) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- releasing and unloading ----------------------------------------------------------------

    def _release(self, loaded: Loaded) -> None:
        loaded.refcount -= 1
        if loaded.refcount > 0:
            return
        if self._loaded.get(loaded.ref.digest) is not loaded:
            pass  # already replaced or unloaded
        elif not loaded.runner.alive or loaded.keep_alive <= 0:
            # Through _expire, which looks again: a request may attach before the task runs.
            asyncio.get_running_loop().create_task(self._expire(loaded))
        else:
            self._start_timer(loaded)
        asyncio.get_running_loop().create_task(self._notify())

    def _start_timer(self, loaded: Loaded) -> None:
        self._cancel_timer(loaded)
        if math.isinf(loaded.keep_alive):
            loaded.expires_at = math.inf
            loaded.expiry_wall = datetime.now(timezone.utc) + FOREVER_DELTA
            return
        loop = asyncio.get_running_loop()
        loaded.expires_at = time.monotonic() + loaded.keep_alive
        loaded.expiry_wall = datetime.now(timezone.utc) + timedelta(seconds=loaded.keep_alive)
        loaded.timer = loop.call_later(loaded.keep_alive, lambda: loop.create_task(self._expire(loaded)))

    def _cancel_timer(self, loaded: Loaded) -> None:
        if loaded.timer is not None:
            loaded.timer.cancel()
            loaded.timer = None
        loaded.expires_at = None

    async def _expire(self, loaded: Loaded) -> None:
        if loaded.refcount == 0 and self._loaded.get(loaded.ref.digest) is loaded:
            await self._unload(loaded)

    async def _unload(self, loaded: Loaded) -> None:
        self._cancel_timer(loaded)
        if self._loaded.get(loaded.ref.digest) is loaded:
            del self._loaded[loaded.ref.digest]
        self.metrics.loaded_models.set(len(self._loaded))
        log.info("unloading %s", loaded.ref.name.display)
        await asyncio.to_thread(loaded.runner.stop)
        await self._notify()

    async def unload(self, digest: Digest) -> bool:
        """Unload a model when it becomes idle (explicit `keep_alive: 0`). False if it was not loaded."""
        loaded = self._loaded.get(digest)
        if loaded is None:
            return False
        loaded.keep_alive = 0
        if loaded.refcount == 0:
            await self._unload(loaded)
        return True

    def is_loaded(self, digest: Digest) -> bool:
        loaded = self._loaded.get(digest)
        return loaded is not None and loaded.runner.alive

    async def shutdown(self) -> None:
        for loaded in list(self._loaded.values()):
            await self._unload(loaded)

    # -- reporting ------------------------------------------------------------------------------

    def running(self) -> list[dict[str, Any]]:
        """`/api/ps` entries, latest expiry first."""
        now = datetime.now(timezone.utc)
        entries = []
        for loaded in self._loaded.values():
            if loaded.refcount > 0 or loaded.expires_at is None:
                keep = loaded.keep_alive
                expiry = now + (FOREVER_DELTA if math.isinf(keep) else timedelta(seconds=max(keep, 0)))
            else:
                expiry = loaded.expiry_wall
            share = float(loaded.runner.info.get("gpu_share") or 0.0)
            entries.append({
                "name": loaded.ref.name.display,
                "model": loaded.ref.name.display,
                "size": loaded.ref.size,
                "size_vram": round(loaded.ref.size * share),
                "digest": loaded.ref.digest.hex,
                "details": loaded.ref.details,
                "expires_at": expiry.astimezone().isoformat(),
                "context_length": loaded.context_length,
            })
        entries.sort(key=lambda e: e["expires_at"], reverse=True)
        return entries
