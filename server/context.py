"""The application's objects, built once at start-up and passed to handlers (no module globals)."""

from __future__ import annotations

from dataclasses import dataclass

from registry.keys import KeyStore
from registry.library import Library
from server.inference import Inference
from server.metrics import Metrics
from server.scheduler import Scheduler
from server.settings import Settings


@dataclass
class AppContext:
    settings: Settings
    library: Library
    scheduler: Scheduler
    inference: Inference
    keys: KeyStore
    metrics: Metrics

    @classmethod
    def build(cls, settings: Settings, library: Library) -> "AppContext":
        metrics = Metrics()
        scheduler = Scheduler(max_loaded=settings.max_loaded_models, num_parallel=settings.num_parallel,
                              max_queue=settings.max_queue, default_keep_alive=settings.keep_alive,
                              load_timeout=settings.load_timeout, metrics=metrics)
        return cls(settings, library, scheduler, Inference(library, scheduler, settings), KeyStore(library), metrics)

    async def aclose(self) -> None:
        await self.scheduler.shutdown()
        self.library.close()
