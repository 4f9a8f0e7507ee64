"""Building the FastAPI application and running it."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI

from berth.registry.default_model import ensure_default_model
from berth.registry.library import Library
from berth.server import __version__
from berth.server.api import errors, inference, keys, oci, ollama
from berth.server.api import openai
from berth.server.api import registry as registry_api
from berth.server.api import create
from berth.server.context import AppContext
from berth.server.auth import AuthMiddleware
from berth.server.gpu_probe import log_devices
from berth.server.guard import GuardMiddleware
from berth.server.metrics import MetricsMiddleware
from berth.server.settings import Settings

log = logging.getLogger("berth.server")


def open_context(settings: Settings) -> AppContext:
    """Open the catalog (running migrations), sweep dead temp files, import the default model."""
    library = Library(settings.models_dir)
    try:
        swept = library.blobs.sweep_temp_files()
        if swept:
            log.info("removed %d temporary files left by interrupted writes", len(swept))
        if settings.import_default_model:
            ensure_default_model(library)
    except BaseException:
        library.close()
        raise
    return AppContext.build(settings, library)


def create_app(context: AppContext) -> FastAPI:
    """The application over an opened context; the context is closed when the app shuts down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await context.aclose()

    app = FastAPI(title="Berth", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.context = context
    errors.install(app)
    settings = context.settings
    # Added last, the guard runs first: a rebinding attempt is refused before any key is looked at.
    app.add_middleware(AuthMiddleware, keys=context.keys, required=settings.keys_required,
                       loopback_needs_key=settings.loopback_needs_key)
    app.add_middleware(GuardMiddleware, check_host=settings.host.is_loopback, origins=settings.origins)
    # Outermost: every request is counted and logged, refused ones included.
    app.add_middleware(MetricsMiddleware, metrics=context.metrics)
    app.include_router(ollama.router)
    app.include_router(keys.router)
    app.include_router(oci.router)
    app.include_router(inference.router)
    app.include_router(openai.router)
    app.include_router(registry_api.router)
    app.include_router(create.router)
    return app


def serve(settings: Settings) -> None:
    """Open the store first, so a bad catalog fails before the port opens, then serve."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    context = open_context(settings)
    context.start_handoff()
    # In the background: start-up is not held up by loading llama.cpp in the probe process.
    threading.Thread(target=log_devices, name="gpu-probe", daemon=True).start()
    if settings.keys_required and not context.keys.any_keys():
        log.warning("listening beyond loopback with API keys required, and no key exists yet: make one on this "
                    "machine with `berth keys create --name admin --scope admin`")
    elif not settings.host.is_loopback and settings.no_auth:
        log.warning("listening on %s WITHOUT authentication (--no-auth): anyone who can reach it can pull, "
                    "push, create and delete models", settings.host.url)
    log.info("Berth %s listening on %s, models in %s", __version__, settings.host.url, settings.models_dir)
    uvicorn.run(create_app(context), host=settings.host.host, port=settings.host.port, log_level="warning",
                access_log=False)
