"""Create: a model from an existing model or from GGUF files, with template, system, parameters,
messages and licenses (docs/ollama-compatibility.md, "Create layers").

No HTTP here. `plan_from_request` (the current request shape) and `plan_from_modelfile` (the
early-2024 shape, a Modelfile whose FROM names `@sha256:…` blobs) check a request and turn it
into a `CreatePlan`; `ModelCreator.create` builds the model and yields Ollama's progress messages.

Files are blobs already in the store, named by digest: uploaded (`POST /api/blobs/<digest>`) or,
from the CLI on the server's own machine, handed over as open files (registry/file_handoff.py).
The server never opens a path a request names: every such path gets the same answer, without
the filesystem being consulted, so no client learns what exists on the server or what a file
holds (CVE-2024-39719, CVE-2024-39722).

Every check that can fail without reading weights runs before the first progress message, so
such errors get their proper HTTP status. GGUF headers are inspected in a child process
(`gguf.inspect_isolated`). Nothing is visible under the new name until the last step, which
points the name at the manifest in one transaction (and collects what only the replaced
manifest used); a crash before it leaves at most unreferenced blobs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

from berth.registry import gguf, modelfile_request, options
from berth.registry.builder import ModelBuilder
from berth.registry.digest import Digest
from berth.registry.errors import InvalidInput, ModelNotFound
from berth.registry.library import Library
from berth.registry.manifest import (
    LICENSE_LAYER,
    MESSAGES_LAYER,
    PARAMS_LAYER,
    PROMPT_LAYER,
    SYSTEM_LAYER,
    TEMPLATE_LAYER,
    Descriptor,
    ModelConfig,
)
from berth.registry.modelfile import MESSAGE_ROLES, Message
from berth.registry.modelfile import parse as parse_modelfile
from berth.registry.names import ModelName
from berth.registry.options import OptionValues

# The largest file create accepts: far above any GGUF that fits one machine, low enough to stop
# a stream that never ends. `POST /api/blobs` uses the same bound.
MAX_BLOB_BYTES = 64 * 1024**3

# The one answer to any request that names a file on the server by its path, whatever the path
# and whoever asks: the answer must not depend on what is there.
PATHS_REFUSED = (
    "the server does not open files by path; upload the file's bytes (POST /api/blobs/<digest>) and "
    "refer to it by digest, and send a Modelfile's text as \"modelfile\" (berth create does both)"
)
# FROM and ADAPTER values that name a file rather than a model.
_PATH_PREFIXES = ("/", "./", "../", "~")


class MissingBlob(InvalidInput):
    """A create request names a blob that was never uploaded."""

    def __init__(self, digest: Digest) -> None:
        super().__init__(f'blob "{digest}" not found; upload it first with POST /api/blobs/{digest}')


@dataclass(frozen=True)
class FileSource:
    """One weights file of a request: its key in `files`/`adapters` and the blob that holds it."""

    name: str
    digest: Digest


@dataclass(frozen=True)
class CreatePlan:
    """A checked create request. Text fields left None (and empty messages) keep the base's."""

    base_model: str | None = None
    files: tuple[FileSource, ...] = ()
    adapters: tuple[FileSource, ...] = ()
    template: str | None = None
    system: str | None = None
    parameters: OptionValues = field(default_factory=OptionValues)
    messages: tuple[Message, ...] = ()
    licenses: tuple[str, ...] = ()
    requires: str | None = None


# ---------------------------------------------------------------------------------------------
# Requests to plans


def plan_from_request(
    *,
    from_: str | None = None,
    files: Mapping[str, str] | None = None,
    adapters: Mapping[str, str] | None = None,
    template: str | None = None,
    system: str | None = None,
    parameters: Mapping[str, object] | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    license: str | Sequence[str] | None = None,
    requires: str | None = None,
) -> CreatePlan:
    """Check the current request shape (Ollama 0.5.5+). File values are `sha256:` digests of
    blobs in the store."""
    if not from_ and not files:
        raise InvalidInput("neither 'from' or 'files' was specified")
    return CreatePlan(
        base_model=from_ or None,
        files=_file_sources(files),
        adapters=_file_sources(adapters),
        template=template,
        system=system,
        parameters=_parameters(parameters),
        messages=_messages(messages),
        licenses=(license,) if isinstance(license, str) else tuple(license or ()),
        requires=requires or None,
    )


def plan_from_modelfile(modelfile: str | None, path: str | None) -> CreatePlan:
    """Check the early-2024 request shape: a Modelfile's text, whose FROM and ADAPTER values are
    `@sha256:<hex>` (an uploaded blob) or a model name. Its `path` (the Modelfile's place on the
    client's disk, which old clients sent beside the text) is never opened: a request with only
    a path gets PATHS_REFUSED, as does a FROM or ADAPTER that is a path."""
    if modelfile is None:
        raise InvalidInput(PATHS_REFUSED if path else "path or modelfile are required")
    parsed = parse_modelfile(modelfile)

    def locate(value: str) -> tuple[str, FileSource] | None:
        if value.startswith("@"):
            digest = Digest.parse(value[1:])
            return digest.filename, FileSource(digest.filename, digest)
        if value.startswith(_PATH_PREFIXES) or value in (".", ".."):
            raise InvalidInput(PATHS_REFUSED)
        return None

    request = modelfile_request.split(parsed, locate)
    return CreatePlan(
        base_model=request.base_model,
        files=tuple(item.source for item in request.files),
        adapters=tuple(item.source for item in request.adapters),
        template=request.template,
        system=request.system,
        parameters=request.parameters,
        messages=request.messages,
        licenses=request.licenses,
        requires=request.requires,
    )


def _file_sources(values: Mapping[str, str] | None) -> tuple[FileSource, ...]:
    sources: list[FileSource] = []
    for name, value in sorted((values or {}).items()):
        _check_file_key(name)
        if value.startswith(_PATH_PREFIXES):
            raise InvalidInput(PATHS_REFUSED)
        sources.append(FileSource(name, Digest.parse(value)))
    return tuple(sources)


def _check_file_key(name: str) -> None:
    # Go's io/fs.ValidPath, which Ollama applies: relative, slash-separated, no . or .. elements.
    parts = name.split("/")
    if not name or any(part in ("", ".", "..") for part in parts):
        raise InvalidInput(f"file path must be relative: {name!r}")
    if name.endswith(".safetensors"):
        raise InvalidInput(
            f"{name}: safetensors models are not supported yet; convert the model to GGUF "
            "(llama.cpp's convert_hf_to_gguf.py) and create from the .gguf file"
        )


def _parameters(raw: Mapping[str, object] | None) -> OptionValues:
    parsed = options.parse_options(raw)
    unknown = [name for name in parsed.ignored if name not in parsed.deprecated]
    if unknown:
        raise InvalidInput(f"unknown parameter '{unknown[0]}'; parameter names are e.g. temperature, num_ctx, stop")
    return parsed.values


def _messages(raw: Sequence[Mapping[str, Any]] | None) -> tuple[Message, ...]:
    messages: list[Message] = []
    for index, item in enumerate(raw or ()):
        role, content = item.get("role"), item.get("content", "")
        if role not in MESSAGE_ROLES:
            raise InvalidInput(f'message {index}: role must be one of "system", "user", or "assistant", not {role!r}')
        if not isinstance(content, str):
            raise InvalidInput(f"message {index}: content must be text")
        messages.append(Message(role, content))
    return tuple(messages)


# ---------------------------------------------------------------------------------------------
# Building


@dataclass
class _Layer:
    """A layer of the model being built, and what must happen before its blob exists."""

    descriptor: Descriptor
    text: bytes | None = None  # a text layer still to be written


@dataclass
class _Inspected:
    source: FileSource
    adapter: bool  # named in `adapters` rather than `files`
    layer: _Layer
    info: gguf.GGUFInfo


class ModelCreator:
    """Builds models for create requests. `check_template` raises InvalidInput for a bad template
    (the template engine lives in `server/`, which registry does not import)."""

    def __init__(self, library: Library, check_template: Callable[[str], None] | None = None) -> None:
        self.library = library
        self.check_template = check_template

    def create(self, name: ModelName, plan: CreatePlan) -> Iterator[dict[str, Any]]:
        """Build `plan` as `name`, yielding Ollama's progress messages; the last is `success`."""
        if not plan.base_model and not plan.files:
            raise InvalidInput("neither 'from' or 'files' was specified")
        if len(plan.adapters) > 1:
            raise InvalidInput("only one adapter is currently supported")
        if plan.template is not None and self.check_template is not None:
            self.check_template(plan.template)
        with ExitStack() as cleanup:
            layers, config = self._base(plan.base_model, cleanup)
            kinds = [(source, False) for source in plan.files] + [(source, True) for source in plan.adapters]
            for source, _ in kinds:
                self._check_blob(source, cleanup)

            inspected: list[_Inspected] = []
            for source, adapter in kinds:
                yield {"status": "parsing GGUF"}
                inspected.append(self._inspect(source, adapter))
            config = _config(config, [item.info for item in inspected if not item.adapter], plan.requires)
            for item in inspected:
                if item.adapter:
                    _check_adapter(item, config)
                layers.append(item.layer)

            layers = self._with_text_layers(layers, plan, cleanup)
            created = self._write_blobs(layers)
            for layer in layers:
                digest = layer.descriptor.digest
                verb = "creating new" if digest in created else "using existing"
                yield {"status": f"{verb} layer {digest}"}

            yield {"status": "writing manifest"}
            builder = ModelBuilder(self.library)
            for layer in layers:
                builder.add_blob(layer.descriptor.media_type, layer.descriptor.digest, layer.descriptor.size,
                                 layer.descriptor.from_)
            builder.commit(name, config)  # releases its pins however it ends
            for item in inspected:
                self.library.set_model_info(item.layer.descriptor.digest, gguf.model_info(item.info))
        # The tag's own collection ran while this create still pinned the base model's blobs; with
        # the pins gone, what only the replaced manifest used (FROM the same name) can go now.
        self.library.collect_garbage()
        yield {"status": "success"}

    def _base(self, text: str | None, cleanup: ExitStack) -> tuple[list[_Layer], ModelConfig | None]:
        """The base model's layers (provenance set to its name) and config, its blobs pinned."""
        if not text:
            return [], None
        try:
            stored = self.library.get(text)
        except ModelNotFound:
            raise ModelNotFound(text, f'model "{text}" not found; pull it first with `berth pull {text}`') from None
        manifest = stored.manifest
        cleanup.enter_context(self.library.pinned([desc.digest for desc in manifest.blobs()]))
        shown = stored.name.display
        layers = [_Layer(replace(desc, from_=shown)) for desc in manifest.layers]
        return layers, self.library.config(manifest)

    def _check_blob(self, source: FileSource, cleanup: ExitStack) -> None:
        """The request's blob must be in the store; pinned, so no collection removes it meanwhile."""
        cleanup.enter_context(self.library.pinned([source.digest]))
        if not self.library.blobs.exists(source.digest):
            raise MissingBlob(source.digest)

    def _inspect(self, source: FileSource, adapter: bool) -> _Inspected:
        info = gguf.inspect_isolated(self.library.blob_path(source.digest))
        size = self.library.blobs.size(source.digest)
        layer = _Layer(Descriptor(info.media_type, source.digest, size, source.name))
        return _Inspected(source, adapter, layer, info)

    def _with_text_layers(self, layers: list[_Layer], plan: CreatePlan, cleanup: ExitStack) -> list[_Layer]:
        """The order Ollama gives layers (docs/ollama-compatibility.md, "Create layers"): a given
        template or system replaces the old layer and goes last, then
        licenses are appended, then the merged parameters, then messages (when given)."""

        def text_layer(media_type: str, data: bytes) -> _Layer:
            digest = Digest.of_bytes(data)
            cleanup.enter_context(self.library.pinned([digest]))
            return _Layer(Descriptor(media_type, digest, len(data)), text=data)

        def replaced(kept: list[_Layer], media_types: tuple[str, ...], new: _Layer) -> list[_Layer]:
            return [layer for layer in kept if layer.descriptor.media_type not in media_types] + [new]

        if plan.template is not None:
            layers = replaced(layers, (TEMPLATE_LAYER, PROMPT_LAYER), text_layer(TEMPLATE_LAYER, plan.template.encode()))
        if plan.system is not None:
            layers = replaced(layers, (SYSTEM_LAYER,), text_layer(SYSTEM_LAYER, plan.system.encode()))
        layers += [text_layer(LICENSE_LAYER, text.encode()) for text in plan.licenses]
        inherited = [layer for layer in layers if layer.descriptor.media_type == PARAMS_LAYER]
        parameters: dict[str, Any] = dict(self._json(inherited[-1])) if inherited else {}
        parameters.update(modelfile_request.parameters_json(plan.parameters))
        layers = [layer for layer in layers if layer.descriptor.media_type != PARAMS_LAYER]
        if parameters:
            layers.append(text_layer(PARAMS_LAYER, _json_bytes(dict(sorted(parameters.items())))))
        if plan.messages:
            data = _json_bytes(modelfile_request.messages_json(plan.messages))
            layers = replaced(layers, (MESSAGES_LAYER,), text_layer(MESSAGES_LAYER, data))
        return layers

    def _json(self, layer: _Layer) -> Mapping[str, Any]:
        value = self.library.json_layer(layer.descriptor)
        return value if isinstance(value, dict) else {}

    def _write_blobs(self, layers: list[_Layer]) -> set[Digest]:
        """Write the text layers; the digests that were not stored before."""
        created: set[Digest] = set()
        for layer in layers:
            if layer.text is not None:
                stored = self.library.blobs.write_bytes(layer.text)
                if stored.created:
                    created.add(stored.digest)
        return created


def _json_bytes(value: object) -> bytes:
    # Ollama's encoding of params and messages layers: compact, with a trailing newline.
    return (json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def _config(base: ModelConfig | None, files: list[gguf.GGUFInfo], requires: str | None) -> ModelConfig:
    """The config blob: from the model files' GGUF headers when there are any, else the base's."""
    models = [info for info in files if info.kind == "model"]
    if models:
        first = models[0]
        config = ModelConfig(
            model_format="gguf",
            model_family=first.architecture or "unknown",
            model_families=tuple(info.architecture or "unknown" for info in models),
            model_type=first.parameter_size,
            file_type=first.file_type_name,
        )
    elif base is not None:
        config = base
    else:
        raise InvalidInput(
            "the files hold no model weights (only adapters or projectors); add FROM with the model"
        )
    return replace(config, extra={"requires": requires}) if requires else config


def _check_adapter(item: _Inspected, config: ModelConfig) -> None:
    if item.info.kind != "adapter":
        raise InvalidInput(f'"{item.source.name}" is not a LoRA adapter: its GGUF general.type is not "adapter"')
    if config.model_family and item.info.architecture != config.model_family:
        raise InvalidInput(
            f'adapter "{item.source.name}" is for the {item.info.architecture!r} architecture but the model '
            f"is {config.model_family!r}; use an adapter trained for this model"
        )
