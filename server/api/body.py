"""Reading request bodies: bounded, JSON-decoded, validated into a pydantic model, errors as 400."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from registry.errors import InvalidInput, TooLarge

# JSON API bodies are small; a big one is a mistake or an attack (images are the largest use).
MAX_JSON_BODY = 64 * 1024 * 1024

Body = TypeVar("Body", bound=BaseModel)


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


async def parse_json(request: Request, model: type[Body]) -> Body:
    """Decode the body into `model`; a missing, malformed or mistyped body is a clear 400."""
    raw = await read_body(request)
    if not raw.strip():
        raise InvalidInput("missing request body")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"invalid JSON in request body: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidInput(f"invalid request: {problems}") from None
