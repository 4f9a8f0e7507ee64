"""Ollama's streaming convention, shared by every streaming endpoint.

NDJSON by default; an error before the first line gets its proper status and `{"error": ...}`
(the caller's exception handler does that, since nothing was sent); an error after it becomes a
final `{"error": ...}` line; `stream: false` answers once.
"""

from __future__ import annotations

import json
import logging
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from berth.registry.errors import BerthError
from berth.server.api.disconnect import ClientGone, nobody_listening, unless_disconnected

log = logging.getLogger("berth.api")


async def respond(chunks: AsyncIterator[dict[str, Any]], stream: bool, merge_key: str | None = None,
                  request: Request | None = None) -> Response:
    """Stream NDJSON; or, for `stream: false`, answer once: with the text of `merge_key`
    concatenated over all chunks (generate, chat), or with the last chunk (pull, push, create).
    With `request`, a client that leaves while the first chunk is awaited (a wait for a slot, say),
    or before a `stream: false` answer is complete, stops the work; once streaming, the transport
    notices."""
    try:
        first = await unless_disconnected(request, anext(chunks))
        if not stream:
            async with aclosing(chunks):
                work = _last(first, chunks) if merge_key is None else _collect(first, chunks, merge_key)
                return JSONResponse(await unless_disconnected(request, work))
    except StopAsyncIteration:
        return JSONResponse({"error": "the operation ended without any output"}, status_code=500)
    except ClientGone:
        await chunks.aclose()
        return nobody_listening()

    async def lines() -> AsyncIterator[bytes]:
        yield _line(first)
        try:
            async for chunk in chunks:
                yield _line(chunk)
        except BerthError as exc:
            yield _line({"error": exc.message})
        except Exception as exc:  # noqa: BLE001 - the status is sent; report in-band
            log.exception("error while streaming")
            yield _line({"error": f"{type(exc).__name__}: {exc}"})
        finally:
            await chunks.aclose()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _line(chunk: dict[str, Any]) -> bytes:
    return (json.dumps(chunk, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


async def _last(first: dict[str, Any], chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    last = first
    async for last in chunks:
        pass
    return last


async def _collect(first: dict[str, Any], chunks: AsyncIterator[dict[str, Any]], merge_key: str) -> dict[str, Any]:
    text: list[str] = []
    calls: list[Any] = []
    logprobs: list[Any] = []
    last = first
    async for chunk in _chain(first, chunks):
        last = chunk
        logprobs.extend(chunk.get("logprobs", ()))
        if merge_key == "message":
            message = chunk.get("message", {})
            text.append(message.get("content", ""))
            calls.extend(message.get("tool_calls", []))
        else:
            text.append(chunk.get(merge_key, ""))
    result = dict(last)
    if merge_key == "message":
        message = dict(result.get("message", {"role": "assistant"}))
        message["content"] = "".join(text)
        if calls:
            message["tool_calls"] = calls
        result["message"] = message
    else:
        result[merge_key] = "".join(text)
    if logprobs:
        result["logprobs"] = logprobs
    return result


async def _chain(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for item in rest:
        yield item
