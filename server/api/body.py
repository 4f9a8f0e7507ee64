"""Reading request bodies: bounded, JSON-decoded, validated into a pydantic model, errors as 400.

Types are enforced as Go's decoder enforces them for Ollama: a string or a number where a
boolean belongs (`"stream": "false"`, `"stream": 1`) is refused, not read as true or false, and
so is a float where an integer belongs. Unknown fields are ignored, as Ollama ignores them.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from berth.registry import bounded_json
from berth.registry.errors import InvalidField, InvalidInput, TooLarge

# JSON API bodies are small; a big one is a mistake or an attack (images are the largest use).
MAX_JSON_BODY = 64 * 1024 * 1024

Body = TypeVar("Body", bound=BaseModel)

# What pydantic's strict error types expect, in JSON's words.
_EXPECTED = {
    "bool_type": "a boolean", "int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
    "string_type": "a string", "dict_type": "an object", "model_type": "an object", "list_type": "an array",
    "tuple_type": "an array", "model_attributes_type": "an object",
}


async def read_body(request: Request, limit: int = MAX_JSON_BODY) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"request body is larger than the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_object(raw: bytes) -> dict[str, Any]:
    """A body's JSON object; a missing, malformed, non-object or too deeply nested body is a 400."""
    if not raw.strip():
        raise InvalidInput("missing request body")
    try:
        doc = bounded_json.decode(raw)
    except ValueError as exc:
        raise InvalidInput(f"invalid JSON in request body: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    return doc


def validate(model: type[Body], doc: dict[str, Any]) -> Body:
    """`doc` as `model`, types enforced; the first wrong field is named in a 400."""
    try:
        return model.model_validate(doc, strict=True)
    except ValidationError as exc:
        raise field_error(doc, exc.errors()) from None


async def parse_json(request: Request, model: type[Body]) -> Body:
    """Decode the body into `model`; a missing, malformed or mistyped body is a clear 400."""
    return validate(model, decode_object(await read_body(request)))


def json_type(value: Any) -> str:
    """A Python value decoded from JSON, named as JSON names its type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def field_error(doc: Any, errors: list[Any]) -> InvalidField:
    """Pydantic's errors as one InvalidField naming the first wrong field by its path in the body.

    Pydantic's location also names union members (`stop.str`, `stop.list[str]`): the path keeps
    only the steps that exist in the document (and a missing field's own name), and the members'
    expectations are joined (`expected a string or an array`)."""
    located = [(*_located(doc, error), error) for error in errors]
    name, node, first = located[0]
    if first.get("type") == "missing":
        return InvalidField(name, f'invalid request: "{name}" is required')
    expected = [_EXPECTED[error["type"]] for path, _, error in located
                if path == name and error.get("type") in _EXPECTED]
    if len(expected) == len([path for path, _, _ in located if path == name]):
        wanted = " or ".join(dict.fromkeys(expected))
        return InvalidField(name, f'invalid value for "{name}": expected {wanted}, got {json_type(node)}')
    return InvalidField(name, f'invalid value for "{name}": {first.get("msg", "not valid here")}')


def _located(doc: Any, error: Any) -> tuple[str, Any]:
    """The dotted path of the value an error is about, and that value."""
    path: list[str] = []
    node = doc
    location = list(error.get("loc", ()))
    for index, step in enumerate(location):
        if isinstance(node, dict) and isinstance(step, str) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        elif error.get("type") == "missing" and index == len(location) - 1:
            path.append(str(step))
            break
        else:
            break
        path.append(str(step))
    return ".".join(path) or "body", node
