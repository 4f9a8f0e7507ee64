"""Assembling a model from layers: text layers become blobs, then the config, manifest and name.

Used by the default-model import and by create. Every blob written is pinned until the name is
committed, so a concurrent GC cannot take it away in between.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from berth.registry.digest import Digest
from berth.registry.library import GcReport, Library
from berth.registry.manifest import DOCKER_CONFIG, Descriptor, Manifest, ModelConfig
from berth.registry.names import ModelName


@dataclass
class ModelBuilder:
    library: Library
    layers: list[Descriptor] = field(default_factory=list)
    _pins: ExitStack = field(default_factory=ExitStack)

    def add_blob(self, media_type: str, digest: Digest, size: int, from_: str | None = None) -> Descriptor:
        self._pins.enter_context(self.library.pinned([digest]))
        desc = Descriptor(media_type, digest, size, from_)
        self.layers.append(desc)
        return desc

    def add_text(self, media_type: str, text: str) -> Descriptor:
        return self._add_bytes(media_type, text.encode("utf-8"))

    def add_json(self, media_type: str, value: Any) -> Descriptor:
        return self._add_bytes(media_type, json.dumps(value, separators=(",", ":")).encode())

    def _add_bytes(self, media_type: str, data: bytes) -> Descriptor:
        stored = self.library.blobs.write_bytes(data)
        return self.add_blob(media_type, stored.digest, stored.size)

    def commit(self, name: ModelName, config: ModelConfig) -> tuple[Manifest, GcReport]:
        """Write the config blob and the manifest, and point `name` at it in one transaction."""
        try:
            stored = self.library.blobs.write_bytes(config.to_bytes())
            self._pins.enter_context(self.library.pinned([stored.digest]))
            manifest = Manifest.build(Descriptor(DOCKER_CONFIG, stored.digest, stored.size), self.layers)
            report = self.library.tag(name, manifest)
            return manifest, report
        finally:
            self._pins.close()

    def abandon(self) -> None:
        self._pins.close()
