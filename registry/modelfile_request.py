"""From a parsed Modelfile to the fields of a create request.

Ollama's client does this before it calls `/api/create` (its `Modelfile.CreateRequest`): a FROM or
ADAPTER value that names a file becomes a file to send, any other FROM value is a model name, and
the rest maps field by field. Berth's CLI does it on the client, and the server does it for the
early-2024 request shape, whose Modelfile names uploaded blobs as `@sha256:…`. What a value names
differs by side (a local path for the CLI; a blob, or a server path for a loopback client, on the
server), so the caller supplies `locate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from berth.registry.errors import InvalidInput
from berth.registry.modelfile import Message, Modelfile
from berth.registry.options import OptionValue, OptionValues

Source = TypeVar("Source")


@dataclass(frozen=True)
class NamedFile(Generic[Source]):
    """A weights file of the request: its key in `files`/`adapters` and what the caller located."""

    name: str
    source: Source


@dataclass(frozen=True)
class ModelfileRequest(Generic[Source]):
    """A Modelfile split into a create request's fields."""

    base_model: str | None
    files: tuple[NamedFile[Source], ...]
    adapters: tuple[NamedFile[Source], ...]
    template: str | None
    system: str | None
    parameters: OptionValues
    messages: tuple[Message, ...]
    licenses: tuple[str, ...]
    requires: str | None

    def json_fields(self) -> dict[str, Any]:
        """Everything but the model and its files, as the current create request spells it."""
        fields: dict[str, Any] = {}
        if self.base_model is not None:
            fields["from"] = self.base_model
        if self.template is not None:
            fields["template"] = self.template
        if self.system is not None:
            fields["system"] = self.system
        if self.parameters:
            fields["parameters"] = parameters_json(self.parameters)
        if self.messages:
            fields["messages"] = messages_json(self.messages)
        if self.licenses:
            fields["license"] = list(self.licenses)
        if self.requires is not None:
            fields["requires"] = self.requires
        return fields


def split(modelfile: Modelfile, locate: Callable[[str], tuple[str, Source] | None]) -> ModelfileRequest[Source]:
    """Split `modelfile` into request fields.

    `locate(value)` says what a FROM or ADAPTER value names: `(key, source)` for a file, None for
    a model name (which an ADAPTER may not be).
    """
    for keyword, value in (("DRAFT", modelfile.draft), ("RENDERER", modelfile.renderer),
                           ("PARSER", modelfile.parser)):
        if value is not None:
            raise InvalidInput(f"{keyword} is not supported by Berth yet; remove the {keyword} line")
    base_model: str | None = None
    files: list[NamedFile[Source]] = []
    for value in modelfile.from_:
        located = locate(value)
        if located is not None:
            files.append(_named(located, files))
        elif base_model is not None:
            raise InvalidInput(
                f'FROM "{base_model}" and FROM "{value}" both name a model; a model has one base. '
                "Keep one, or give the path of a file (e.g. a vision projector) that exists"
            )
        else:
            base_model = value
    adapters: list[NamedFile[Source]] = []
    for value in modelfile.adapters:
        located = locate(value)
        if located is None:
            raise InvalidInput(f'ADAPTER "{value}" is not a file; give the path of a LoRA adapter in GGUF format')
        adapters.append(_named(located, adapters))
    return ModelfileRequest(
        base_model=base_model,
        files=tuple(files),
        adapters=tuple(adapters),
        template=modelfile.template,
        system=modelfile.system,
        parameters=OptionValues(modelfile.parameters),
        messages=modelfile.messages,
        licenses=modelfile.licenses,
        requires=modelfile.requires,
    )


def _named(located: tuple[str, Source], taken: list[NamedFile[Source]]) -> NamedFile[Source]:
    """Keys must be unique: a second `model.gguf` from another folder becomes `2-model.gguf`."""
    name, source = located
    names = {item.name for item in taken}
    unique, number = name, 1
    while unique in names:
        number += 1
        unique = f"{number}-{name}"
    return NamedFile(unique, source)


def parameters_json(values: Mapping[str, OptionValue]) -> dict[str, Any]:
    """Typed option values as JSON, keys sorted (as Ollama writes a params layer)."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in sorted(values.items())}


def messages_json(messages: tuple[Message, ...]) -> list[dict[str, str]]:
    return [{"role": message.role, "content": message.content} for message in messages]
