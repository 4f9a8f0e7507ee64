"""Decoding JSON that comes from outside (API bodies, registries, pulled layers) with its nesting bounded.

Python's decoder recurses once per level, so 100,000 nested brackets raise RecursionError from
deep inside it, and a merely deep document makes every later walk over it (validation, schema to
grammar conversion, templates) recurse as far. Real requests and manifests nest a few levels; a
JSON Schema for a `format` or a tool a dozen or so. Python also accepts `NaN` and `Infinity`,
which are not JSON (RFC 8259 section 6) and would reach llama.cpp as numbers it cannot use.
And an escape of half a UTF-16 surrogate pair (`"\ud800"`) decodes to a string that cannot be
encoded as UTF-8, which every tokenizer needs: each such half becomes U+FFFD, as Go's decoder
(and so Ollama) makes it.

Every failure is a ValueError (as `json.loads` raises), so callers' existing handling applies.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64  # levels of objects and arrays; Go's decoder allows 10,000, no real document needs this many
# Escapes of a surrogate half (a valid pair decodes to one character; a lone half stays a surrogate).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class TooDeep(ValueError):
    """A JSON document nests objects and arrays deeper than the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"JSON nests objects and arrays more than {limit} levels deep, the limit; flatten it")
        self.limit = limit


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value; send a finite number")


def decode(raw: str | bytes | bytearray, max_depth: int = MAX_DEPTH) -> Any:
    """The value of a JSON text, refusing NaN, infinities and nesting deeper than `max_depth`."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise TooDeep(max_depth) from None
    if depth(value, max_depth) > max_depth:
        raise TooDeep(max_depth)
    halves = _SURROGATE_ESCAPE.search(raw) if isinstance(raw, str) else _SURROGATE_ESCAPE_BYTES.search(raw)
    return _without_surrogates(value) if halves else value


def _without_surrogates(value: Any) -> Any:
    """`value` with every lone surrogate in its strings (keys too) replaced by U+FFFD; its depth is
    already bounded, so the recursion is."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_surrogates(key): _without_surrogates(item) for key, item in value.items()}
    return value


def depth(value: Any, stop_after: int | None = None) -> int:
    """How many levels of dicts and lists `value` nests (0 for a scalar), counted without recursion;
    the count stops growing once it passes `stop_after`."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        if stop_after is not None and deepest > stop_after:
            return deepest
        pending.extend((child, level) for child in children if isinstance(child, (dict, list)))
    return deepest
