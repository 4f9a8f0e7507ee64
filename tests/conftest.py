"""Fixtures for real services: a Berth server process on a free loopback port with its own store."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import httpx
import pytest

# The local OCI registry fixtures (registry, auth_registry, tls_registry) for every test module.
pytest_plugins = ["tests.registry_fixture"]

if TYPE_CHECKING:
    from berth.registry.library import Library

BIN_DIR = Path(sys.executable).parent


def berth_executable() -> str:
    found = BIN_DIR / "berth"
    if found.exists():
        return str(found)
    path = shutil.which("berth")
    if path is None:
        pytest.fail("the `berth` console script is not installed; run `pip install -e '.[model,test]'`")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class BerthServer:
    url: str
    host: str
    models_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def env(self) -> dict[str, str]:
        """Environment for a CLI process talking to this server."""
        env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST",)}
        env.update(BERTH_HOST=self.host, BERTH_MODELS=str(self.models_dir))
        return env

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_server(models_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None,
                 timeout: float = 120.0) -> BerthServer:
    port = free_port()
    host = f"127.0.0.1:{port}"
    env = {**os.environ, "BERTH_HOST": host, "BERTH_MODELS": str(models_dir), **(extra_env or {})}
    env.pop("OLLAMA_HOST", None)
    log_file = open(log_path, "wb")
    process = subprocess.Popen([berth_executable(), "serve"], env=env, stdout=log_file,
                               stderr=subprocess.STDOUT)
    server = BerthServer(f"http://{host}", host, models_dir, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"berth serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    pytest.fail(f"berth serve did not answer within {timeout}s:\n{server.log()}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BerthServer]:
    """A server holding the default model, shared by tests that do not change its models."""
    base = tmp_path_factory.mktemp("berth-server")
    srv = start_server(base / "models", base / "server.log")
    yield srv
    srv.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[BerthServer]:
    """A server of this test's own, for tests that change or break its store."""
    srv = start_server(tmp_path / "models", tmp_path / "server.log")
    yield srv
    srv.stop()


@pytest.fixture
def library(tmp_path: Path) -> Iterator["Library"]:
    """A catalog and blob store of the test's own."""
    from berth.registry.library import Library

    lib = Library(tmp_path / "models")
    yield lib
    lib.close()


@pytest.fixture
def http(server: BerthServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def add_variant(models_dir: Path, name: str, *, template: str | None = None, system: str | None = None,
                parameters: dict | None = None, base: str = "gemma3:270m") -> None:
    """Add a model sharing `base`'s weights with its own template/system/params, straight into a
    store (the catalog is SQLite in WAL mode, so a running server sees it at once)."""
    from berth.registry.builder import ModelBuilder
    from berth.registry.library import Library
    from berth.registry.manifest import MODEL_LAYER, PARAMS_LAYER, SYSTEM_LAYER, TEMPLATE_LAYER
    from berth.registry.names import ModelName

    library = Library(models_dir)
    try:
        stored = library.get(base)
        weights = stored.manifest.layers_of(MODEL_LAYER)[0]
        builder = ModelBuilder(library)
        builder.add_blob(MODEL_LAYER, weights.digest, weights.size)
        if template is not None:
            builder.add_text(TEMPLATE_LAYER, template)
        if system is not None:
            builder.add_text(SYSTEM_LAYER, system)
        if parameters:
            builder.add_json(PARAMS_LAYER, parameters)
        builder.commit(ModelName.parse(name), library.config(stored.manifest))
    finally:
        library.close()
