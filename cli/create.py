"""`berth create` and `berth import-ollama`.

create parses the Modelfile here (errors name its line), then gets the weights to the server:
* server on this machine (a loopback BERTH_HOST): the files are opened here and handed to the
  server as open files over its Unix socket (registry/file_handoff.py), and it links them into
  its blob store (no copy, one hashing pass, on the server). If that cannot be done (the server
  runs as another user, or is reached through a tunnel), or `upload` is asked for,
* every file is hashed here, the server is asked whether it has that blob
  (`HEAD /api/blobs/<digest>`), and only missing blobs are uploaded, streamed from disk;
then `POST /api/create` (Ollama's current shape) naming the files by digest, and one line per
progress message.

import-ollama works on BERTH_MODELS directly, like `berth fsck`: it needs no server.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from berth.cli.client import Client, ClientError
from berth.cli.humanize import human_bytes
from berth.registry import file_handoff, modelfile_request
from berth.registry.adopt import COPY, HARDLINK, REFLINK
from berth.registry.errors import BerthError, InvalidInput
from berth.registry.modelfile import parse as parse_modelfile

READ_CHUNK = 1024 * 1024
_PLACED = {REFLINK: "cloned", HARDLINK: "linked", COPY: "copied"}

Progress = Callable[[int], None]


class _Output:
    """Status lines, and progress bars when stdout is a terminal; nothing but errors when quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars = not quiet and sys.stdout.isatty()

    def line(self, text: str) -> None:
        if not self.quiet:
            typer.echo(text)

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Progress]:
        if not self.bars:
            yield lambda advance: None
            return
        from rich.progress import (BarColumn, DownloadColumn, Progress as Bars, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        with Bars(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn()) as bars:
            task = bars.add_task(description, total=total)
            yield lambda advance: bars.update(task, advance=advance)


class _CreateClient(Client):
    """The client, plus blob checks and streamed uploads; no read timeout, since a server may
    spend minutes hashing a large file before it answers."""

    def __init__(self) -> None:
        super().__init__(timeout=None)

    def has_blob(self, digest: str) -> bool:
        try:
            self.request("HEAD", f"/api/blobs/{digest}")
        except ClientError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def upload_blob(self, digest: str, chunks: Iterator[bytes], size: int) -> None:
        self.request("POST", f"/api/blobs/{digest}", content=chunks, headers={"content-length": str(size)})


def create_command(name: str, file: str | None, quiet: bool, upload: bool = False) -> None:
    """Create model `name` from the Modelfile at `file` (default ./Modelfile) on the server."""
    modelfile_path = Path(file or "Modelfile")
    request = _read_request(modelfile_path)
    out = _Output(quiet)
    client = _CreateClient()
    body: dict[str, Any] = {"model": name, **request.json_fields(), "stream": True}
    if request.files or request.adapters:
        handed = None
        if client.address.is_loopback and not upload:
            handed = _hand_over(client, request.files + request.adapters, out)
        if handed is not None:
            body["files"] = {item.name: handed[item.source] for item in request.files}
            body["adapters"] = {item.name: handed[item.source] for item in request.adapters}
        else:
            uploader = _Uploader(client, out)
            body["files"] = uploader.send_all(request.files)
            body["adapters"] = uploader.send_all(request.adapters)
            out.line(f"uploaded {uploader.uploaded_files} of {uploader.files} files "
                     f"({uploader.uploaded_bytes} bytes)")
    _stream_create(client, body, out)


def _hand_over(client: Client, files: tuple[modelfile_request.NamedFile[Path], ...],
               out: _Output) -> dict[Path, str] | None:
    """The files' digests once handed to a server on this machine, which links them into its
    store; None (they are then uploaded) when this server cannot take them so."""
    try:
        name = str(client.get_json("/api/handoff")["socket"])
        received = file_handoff.hand_over(name, [str(item.source) for item in files])
    except (ClientError, KeyError, TypeError, OSError, BerthError) as exc:
        if isinstance(exc, ClientError) and exc.status not in (404, None):
            raise  # a refused key, a server error: uploading would fail the same way
        out.line(f"the server cannot take the files from this machine ({exc}); uploading them")
        return None
    for item, stored in zip(files, received):
        out.line(f"{_PLACED.get(stored.method, 'took')} {item.name}")
    return {item.source: stored.digest for item, stored in zip(files, received)}


def _read_request(path: Path) -> modelfile_request.ModelfileRequest[Path]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        hint = "; write one or give its path with -f" if isinstance(exc, FileNotFoundError) else ""
        raise ClientError(f"cannot read the Modelfile {path}: {exc.strerror}{hint}") from None
    try:
        modelfile = parse_modelfile(data)
        request = modelfile_request.split(modelfile, _local_file_locator(path.absolute().parent))
    except BerthError as exc:
        raise ClientError(f"{path}: {exc}") from None
    for warning in modelfile.warnings:
        typer.echo(f"Warning: {path}: {warning}", err=True)
    return request


def _local_file_locator(base: Path) -> Callable[[str], tuple[str, Path] | None]:
    """What a FROM or ADAPTER value names here: an existing file (relative to the Modelfile's
    folder, `~` expanded), else a model name."""

    def locate(value: str) -> tuple[str, Path] | None:
        candidate = Path(value).expanduser()
        candidate = Path(os.path.abspath(base / candidate))
        if candidate.is_dir():
            raise InvalidInput(
                f"{value} is a folder; Berth creates models from GGUF files only for now (convert "
                "safetensors with llama.cpp's convert_hf_to_gguf.py)"
            )
        if candidate.is_file():
            return candidate.name, candidate
        return None

    return locate


class _Uploader:
    """Hashes files and uploads the ones the server lacks, counting what it sent."""

    def __init__(self, client: _CreateClient, out: _Output) -> None:
        self.client = client
        self.out = out
        self.files = 0
        self.uploaded_files = 0
        self.uploaded_bytes = 0

    def send_all(self, files: tuple[modelfile_request.NamedFile[Path], ...]) -> dict[str, str]:
        return {item.name: self.send(item.name, item.source) for item in files}

    def send(self, name: str, path: Path) -> str:
        size = path.stat().st_size
        self.files += 1
        with self.out.progress(f"hashing {name}", size) as advance:
            digest = f"sha256:{_hash_file(path, advance)}"
        if self.client.has_blob(digest):
            self.out.line(f"using existing blob {digest} for {name}")
            return digest
        with self.out.progress(f"uploading {name}", size) as advance:
            self.client.upload_blob(digest, _read_chunks(path, advance), size)
        self.uploaded_files += 1
        self.uploaded_bytes += size
        self.out.line(f"uploaded {name} ({human_bytes(size)})")
        return digest


def _hash_file(path: Path, advance: Progress) -> str:
    hasher = hashlib.sha256()
    for chunk in _read_chunks(path, advance):
        hasher.update(chunk)
    return hasher.hexdigest()


def _read_chunks(path: Path, advance: Progress) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(READ_CHUNK):
            advance(len(chunk))
            yield chunk


def _stream_create(client: Client, body: dict[str, Any], out: _Output) -> None:
    for message in client.stream_json("POST", "/api/create", body):
        if "error" in message:
            raise ClientError(str(message["error"]))
        if message.get("status"):
            out.line(str(message["status"]))


# ---------------------------------------------------------------------------------------------


def import_ollama_command(directory: str | None) -> None:
    """Register every model of the Ollama store at `directory` in BERTH_MODELS, linking blobs."""
    from berth.registry.library import Library
    from berth.registry.ollama_import import AlreadyPresent, Imported, default_ollama_dir, import_store
    from berth.server.settings import Settings

    root = Path(directory).expanduser() if directory else default_ollama_dir()
    try:
        library = Library(Settings.from_env().models_dir)
    except (BerthError, ValueError) as exc:
        raise ClientError(str(exc)) from None
    counts = {"imported": 0, "present": 0, "skipped": 0}
    try:
        for event in import_store(library, root):
            if isinstance(event, Imported):
                counts["imported"] += 1
                how = ", ".join(f"{count} {method}" for method, count in sorted(event.placed.items())) or "no new blobs"
                typer.echo(f"imported {event.name.display} ({human_bytes(event.size)}; {how})")
                if event.warning:
                    typer.echo(f"Warning: {event.name.display}: {event.warning}", err=True)
            elif isinstance(event, AlreadyPresent):
                counts["present"] += 1
                typer.echo(f"{event.name.display} is already in Berth")
            else:
                counts["skipped"] += 1
                typer.echo(f"skipped {event.where}: {event.reason}")
    except BerthError as exc:
        raise ClientError(str(exc)) from None
    finally:
        library.close()
    typer.echo(f"{counts['imported']} imported, {counts['present']} already present, {counts['skipped']} skipped")
    if counts["skipped"]:
        raise ClientError(f"{counts['skipped']} manifests of {root} were not imported (see above)")
