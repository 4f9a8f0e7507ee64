"""Manifests and config blobs in Ollama's format (Docker v2) and OCI's.

A manifest read from disk or a registry is untrusted: every digest is validated, sizes must be
non-negative integers, and the body is bounded before parsing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from berth.registry import bounded_json
from berth.registry.digest import Digest
from berth.registry.errors import CorruptData, InvalidInput

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

OLLAMA_LAYER_PREFIX = "application/vnd.ollama.image."
MODEL_LAYER = OLLAMA_LAYER_PREFIX + "model"
ADAPTER_LAYER = OLLAMA_LAYER_PREFIX + "adapter"
PROJECTOR_LAYER = OLLAMA_LAYER_PREFIX + "projector"
TEMPLATE_LAYER = OLLAMA_LAYER_PREFIX + "template"
PROMPT_LAYER = OLLAMA_LAYER_PREFIX + "prompt"  # legacy alias of template, read-only
SYSTEM_LAYER = OLLAMA_LAYER_PREFIX + "system"
PARAMS_LAYER = OLLAMA_LAYER_PREFIX + "params"
MESSAGES_LAYER = OLLAMA_LAYER_PREFIX + "messages"
LICENSE_LAYER = OLLAMA_LAYER_PREFIX + "license"

# Manifests are small JSON documents; anything bigger is hostile or broken.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# Text layers (template, system, params, messages, license) are read into memory whole.
MAX_TEXT_LAYER_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Descriptor:
    """One entry of a manifest: a blob with its media type and size."""

    media_type: str
    digest: Digest
    size: int
    from_: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.from_:
            out["from"] = self.from_
        return out


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest plus the exact bytes it came from (its digest is theirs)."""

    raw: bytes
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def digest(self) -> Digest:
        return Digest.of_bytes(self.raw)

    @property
    def size(self) -> int:
        """What Ollama's /api/tags reports: every layer plus the config."""
        return self.config.size + sum(layer.size for layer in self.layers)

    def blobs(self) -> list[Descriptor]:
        """Layers then config, each digest once."""
        seen: set[Digest] = set()
        out: list[Descriptor] = []
        for desc in (*self.layers, self.config):
            if desc.digest not in seen:
                seen.add(desc.digest)
                out.append(desc)
        return out

    def layers_of(self, media_type: str) -> list[Descriptor]:
        return [layer for layer in self.layers if layer.media_type == media_type]

    @classmethod
    def parse(cls, raw: bytes) -> "Manifest":
        """Parse and validate untrusted manifest bytes."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise InvalidInput(f"manifest is {len(raw)} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit")
        try:
            doc = bounded_json.decode(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise InvalidInput("manifest is not a JSON object")
        if doc.get("schemaVersion") != 2:
            raise InvalidInput(f"unsupported manifest schemaVersion {doc.get('schemaVersion')!r}; expected 2")
        media_type = doc.get("mediaType") or OCI_MANIFEST
        if media_type not in MANIFEST_TYPES:
            raise InvalidInput(f"unsupported manifest media type {media_type!r}")
        layers_doc = doc.get("layers")
        if not isinstance(layers_doc, list):
            raise InvalidInput("manifest has no layers list")
        return cls(
            raw=raw,
            media_type=media_type,
            config=_descriptor(doc.get("config"), "config"),
            layers=tuple(_descriptor(item, f"layer {i}") for i, item in enumerate(layers_doc)),
        )

    @classmethod
    def build(cls, config: Descriptor, layers: list[Descriptor], media_type: str = DOCKER_MANIFEST) -> "Manifest":
        """Serialise a new manifest the way Ollama writes created ones (compact, trailing newline)."""
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type, "config": config.to_json(),
                               "layers": [layer.to_json() for layer in layers]}
        raw = (json.dumps(doc, separators=(",", ":")) + "\n").encode()
        return cls(raw=raw, media_type=media_type, config=config, layers=tuple(layers))


def _descriptor(item: object, where: str) -> Descriptor:
    if not isinstance(item, dict):
        raise InvalidInput(f"manifest {where} is not an object")
    media_type = item.get("mediaType")
    if not isinstance(media_type, str) or not media_type or len(media_type) > 255:
        raise InvalidInput(f"manifest {where} has an invalid mediaType")
    digest = Digest.parse(item.get("digest"))
    size = item.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"manifest {where} has an invalid size {size!r}")
    from_ = item.get("from")
    return Descriptor(media_type, digest, size, from_ if isinstance(from_, str) else None)


@dataclass(frozen=True)
class ModelConfig:
    """The config blob: what /api/tags and /api/show call `details`."""

    model_format: str = "gguf"
    model_family: str = ""
    model_families: tuple[str, ...] = ()
    model_type: str = ""
    file_type: str = ""
    parent_model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "model_format": self.model_format,
            "model_family": self.model_family,
            "model_families": list(self.model_families) or None,
            "model_type": self.model_type,
            "file_type": self.file_type,
            "architecture": "amd64",
            "os": "linux",
            **self.extra,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "ModelConfig":
        try:
            doc = bounded_json.decode(raw) if raw else {}
        except ValueError as exc:
            raise CorruptData(f"model config is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise CorruptData("model config is not a JSON object")
        families = doc.get("model_families") or []
        return cls(
            model_format=str(doc.get("model_format") or ""),
            model_family=str(doc.get("model_family") or ""),
            model_families=tuple(str(f) for f in families if isinstance(f, str)),
            model_type=str(doc.get("model_type") or ""),
            file_type=str(doc.get("file_type") or ""),
            parent_model=str(doc.get("parent_model") or ""),
        )

    def details(self) -> dict[str, Any]:
        """Ollama's `details` object."""
        return {
            "parent_model": self.parent_model,
            "format": self.model_format,
            "family": self.model_family,
            "families": list(self.model_families) or ([self.model_family] if self.model_family else None),
            "parameter_size": self.model_type,
            "quantization_level": self.file_type,
        }
