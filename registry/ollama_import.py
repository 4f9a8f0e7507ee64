"""`berth import-ollama`: register the models of an Ollama store without downloading anything.

An Ollama store is `manifests/<host>/<namespace>/<model>/<tag>` (JSON manifests) and
`blobs/sha256-<hex>` (docs/ollama-compatibility.md, "Storage"). Each manifest's name and every digest in it
are validated before a path is built from them; each blob is linked into Berth's store (copied
when it is on another filesystem) and hashed on the way, so a damaged Ollama blob is refused
rather than imported. Manifest bytes are kept as they are, so a model has the same digest in both
stores. A server may run on the same Berth store meanwhile: the catalog is SQLite in WAL mode.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from berth.registry import gguf
from berth.registry.adopt import adopt
from berth.registry.digest import Digest
from berth.registry.errors import BerthError, InvalidInput, ModelNotFound
from berth.registry.library import Library
from berth.registry.manifest import MAX_MANIFEST_BYTES, MODEL_LAYER, Manifest
from berth.registry.names import ModelName

log = logging.getLogger("berth.import")

# manifests/<host>/<namespace>/<model>/<tag>
NAME_DEPTH = 4


@dataclass(frozen=True)
class Imported:
    name: ModelName
    size: int  # bytes of every blob the model uses
    placed: Mapping[str, int] = field(default_factory=dict)  # blobs by how they came: hardlink, reflink, copy
    already_stored: int = 0  # blobs Berth had already
    warning: str | None = None


@dataclass(frozen=True)
class AlreadyPresent:
    name: ModelName


@dataclass(frozen=True)
class Skipped:
    where: str  # the manifest's path below manifests/
    reason: str


ImportEvent = Imported | AlreadyPresent | Skipped


def default_ollama_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where Ollama keeps models: $OLLAMA_MODELS, else ~/.ollama/models."""
    return Path(env.get("OLLAMA_MODELS") or "~/.ollama/models").expanduser()


def import_store(library: Library, root: Path) -> Iterator[ImportEvent]:
    """Import every manifest under `root`, one event per manifest; a bad one is skipped, not fatal."""
    manifests_dir = root / "manifests"
    if not manifests_dir.is_dir():
        raise InvalidInput(
            f"{root} is not an Ollama models folder (it has no manifests folder); give the folder that "
            "holds manifests/ and blobs/, e.g. ~/.ollama/models or /usr/share/ollama/.ollama/models"
        )
    for parts, path in _manifest_files(manifests_dir):
        where = "/".join(parts)
        if len(parts) != NAME_DEPTH:
            yield Skipped(where, "not a manifest: manifests are at manifests/<host>/<namespace>/<model>/<tag>")
            continue
        try:
            yield _import_one(library, parts, path, root / "blobs")
        except BerthError as exc:
            yield Skipped(where, exc.message)


def _manifest_files(manifests_dir: Path) -> Iterator[tuple[tuple[str, ...], Path]]:
    """Regular files below `manifests_dir` with their path parts, sorted; symlinks are not followed."""
    for directory, subdirectories, files in os.walk(manifests_dir):
        subdirectories.sort()
        relative = Path(directory).relative_to(manifests_dir).parts
        for name in sorted(files):
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                yield (*relative, name), path


def _import_one(library: Library, parts: tuple[str, ...], path: Path, blobs_dir: Path) -> ImportEvent:
    host, namespace, model, tag = parts
    name = ModelName.parse(f"{host}/{namespace}/{model}:{tag}")
    if (name.host, name.namespace, name.model, name.tag) != (host, namespace, model, tag):
        raise InvalidInput(f"invalid model name: {'/'.join(parts)} does not name a model as Ollama stores them")
    with open(path, "rb") as handle:
        raw = handle.read(MAX_MANIFEST_BYTES + 1)
    manifest = Manifest.parse(raw)  # validates every digest, bounds the size
    try:
        existing = library.get(name)
    except ModelNotFound:
        existing = None
    if existing is not None:
        if existing.manifest.digest == manifest.digest:
            return AlreadyPresent(existing.name)
        raise InvalidInput(
            f"Berth already has a different {existing.name.display}; remove it (berth rm) or copy it to "
            "another name (berth cp) first, then import again"
        )
    placed: Counter[str] = Counter()
    already = 0
    with library.pinned([desc.digest for desc in manifest.blobs()]):
        for desc in manifest.blobs():
            if library.blobs.exists(desc.digest):
                already += 1
                continue
            _, method = adopt(library.blobs, _ollama_blob(blobs_dir, desc.digest, name), expected=desc.digest)
            placed[method] += 1
        library.tag(name, manifest)  # checks every blob's size against the manifest
    return Imported(name, manifest.size, dict(placed), already, _cache_model_info(library, manifest))


def _ollama_blob(blobs_dir: Path, digest: Digest, name: ModelName) -> Path:
    # Stores older than Ollama 0.1.30 named blobs `sha256:<hex>`; Ollama renames them at start.
    for filename in (digest.filename, f"sha256:{digest.hex}"):
        candidate = blobs_dir / filename
        if candidate.is_file():
            return candidate
    raise InvalidInput(
        f"blob {digest} is missing from the Ollama store; run `ollama pull {name.display}` there and import again"
    )


def _cache_model_info(library: Library, manifest: Manifest) -> str | None:
    """Read the weights' GGUF header for /api/show; a model that fails is kept, with a warning."""
    for layer in manifest.layers_of(MODEL_LAYER):
        try:
            info = gguf.inspect_isolated(library.blob_path(layer.digest))
        except (gguf.InvalidGGUF, OSError) as exc:
            log.warning("cannot read the GGUF header of %s: %s", layer.digest, exc)
            return f"its weights are not a readable GGUF file ({exc}); it will not load"
        library.set_model_info(layer.digest, gguf.model_info(info))
    return None

