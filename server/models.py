"""Model views for the API: what /api/tags and /api/show report, read from the library."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from berth.registry import modelfile, options
from berth.registry.library import Library, StoredModel
from berth.registry.manifest import (
    ADAPTER_LAYER,
    LICENSE_LAYER,
    MESSAGES_LAYER,
    MODEL_LAYER,
    PARAMS_LAYER,
    PROJECTOR_LAYER,
    PROMPT_LAYER,
    SYSTEM_LAYER,
    TEMPLATE_LAYER,
    ModelConfig,
)
from berth.server.tools import capabilities_from_template


def local_time(value: datetime) -> str:
    """Ollama reports modification times in local time with an offset."""
    return value.astimezone().isoformat()


@dataclass(frozen=True)
class ModelView:
    """Everything a model's layers say about it, read once."""

    stored: StoredModel
    config: ModelConfig
    template: str | None
    system: str | None
    parameters: dict[str, Any]
    messages: list[dict[str, Any]]
    licenses: list[str]
    model_info: dict[str, Any] = field(default_factory=dict)

    @property
    def capabilities(self) -> list[str]:
        """What the model can do: the one answer for /api/show and for the checks of generate and
        chat. A template grants what it reads (tools/insert/thinking, names in any case, as
        Ollama compares them; nothing if it does not parse); the layers grant the rest."""
        manifest = self.stored.manifest
        granted = capabilities_from_template(self.template) if self.template else set()
        caps = ["completion"] if manifest.layers_of(MODEL_LAYER) else []
        caps += [name for name in ("tools", "insert", "thinking") if name in granted]
        if manifest.layers_of(PROJECTOR_LAYER):
            caps.append("vision")
        return caps

    def modelfile(self, library: Library) -> str:
        manifest = self.stored.manifest
        model = modelfile.Modelfile(
            from_=tuple(str(library.blob_path(layer.digest)) for layer in manifest.layers_of(MODEL_LAYER))
            + tuple(str(library.blob_path(layer.digest)) for layer in manifest.layers_of(PROJECTOR_LAYER)),
            adapters=tuple(str(library.blob_path(layer.digest)) for layer in manifest.layers_of(ADAPTER_LAYER)),
            template=self.template,
            system=self.system,
            parameters=self.parameters,
            messages=tuple(modelfile.Message(m.get("role", ""), m.get("content", "")) for m in self.messages),
            licenses=tuple(self.licenses),
        )
        # Not strict: show what is stored even if some value could not be read back identically.
        return modelfile.render(model, short_name=self.stored.name.display, strict=False)

    def tag_entry(self) -> dict[str, Any]:
        manifest = self.stored.manifest
        name = self.stored.name.display
        return {
            "name": name,
            "model": name,
            "modified_at": local_time(self.stored.modified_at),
            "size": manifest.size,
            "digest": manifest.digest.hex,
            "details": self.config.details(),
        }

    def show(self, library: Library) -> dict[str, Any]:
        return {
            "license": "\n".join(self.licenses),
            "modelfile": self.modelfile(library),
            "parameters": options.format_parameters(self.parameters),
            "template": self.template or "",
            "system": self.system or "",
            "details": self.config.details(),
            "messages": self.messages,
            "model_info": self.model_info,
            "capabilities": self.capabilities,
            "modified_at": local_time(self.stored.modified_at),
        }


def view(library: Library, stored: StoredModel, *, with_info: bool = False) -> ModelView:
    manifest = stored.manifest
    template_layers = manifest.layers_of(TEMPLATE_LAYER) or manifest.layers_of(PROMPT_LAYER)
    system_layers = manifest.layers_of(SYSTEM_LAYER)
    params_layers = manifest.layers_of(PARAMS_LAYER)
    messages_layers = manifest.layers_of(MESSAGES_LAYER)
    params = library.json_layer(params_layers[-1]) if params_layers else {}
    messages = library.json_layer(messages_layers[-1]) if messages_layers else []
    info: dict[str, Any] = {}
    if with_info:
        for layer in manifest.layers_of(MODEL_LAYER)[:1]:
            info = library.model_info(layer.digest) or {}
    return ModelView(
        stored=stored,
        config=library.config(manifest),
        template=library.text_layer(template_layers[-1]) if template_layers else None,
        system=library.text_layer(system_layers[-1]) if system_layers else None,
        parameters=params if isinstance(params, dict) else {},
        messages=[m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else [],
        licenses=[library.text_layer(layer) for layer in manifest.layers_of(LICENSE_LAYER)],
        model_info=info,
    )
