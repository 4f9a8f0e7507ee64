"""The application's objects, built once at start-up and passed to handlers (no module globals)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from berth.registry.keys import KeyStore
from berth.registry.library import Library
from berth.server.inference import Inference
from berth.server.metrics import Metrics
from berth.server.scheduler import Scheduler
from berth.server.settings import Settings

if TYPE_CHECKING:
    from berth.registry.file_handoff import HandoffServer
    from berth.registry.transfers import Transfers


@dataclass
class AppContext:
    settings: Settings
    library: Library
    scheduler: Scheduler
    inference: Inference
    keys: KeyStore
    metrics: Metrics
    # Files handed over by clients on this machine (registry/file_handoff.py); `serve` starts it.
    handoff: "HandoffServer | None" = None
    _transfers: "Transfers | None" = field(default=None, init=False, repr=False)
    _transfers_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def transfers(self) -> "Transfers":
        """Pulls and pushes (registry/transfers.py), built on first use: most starts never need them."""
        with self._transfers_lock:
            if self._transfers is None:
                from berth.registry.transfers import Transfers

                self._transfers = Transfers.from_env(self.library, self.settings.signing_key)
            return self._transfers

    @classmethod
    def build(cls, settings: Settings, library: Library) -> "AppContext":
        metrics = Metrics()
        scheduler = Scheduler(max_loaded=settings.max_loaded_models, num_parallel=settings.num_parallel,
                              max_queue=settings.max_queue, default_keep_alive=settings.keep_alive,
                              load_timeout=settings.load_timeout, metrics=metrics)
        return cls(settings, library, scheduler, Inference(library, scheduler, settings), KeyStore(library), metrics)

    def start_handoff(self) -> None:
        """Listen for handed files where the platform allows it (Linux)."""
        from berth.registry.create import MAX_BLOB_BYTES
        from berth.registry.file_handoff import HandoffServer, supported

        if supported() and self.handoff is None:
            self.handoff = HandoffServer(self.library.blobs, MAX_BLOB_BYTES)

    async def aclose(self) -> None:
        if self.handoff is not None:
            self.handoff.close()
        await self.scheduler.shutdown()
        with self._transfers_lock:
            if self._transfers is not None:
                self._transfers.close()
        self.library.close()
