"""Work done inside a route for a non-streaming answer, stopped when its client goes away.

A streaming answer is stopped by its transport when the client disconnects (the response's
generator is closed, which cancels the generation in the runner). A `stream: false` answer is
collected inside the route first, and nothing there hears the client leave: a generation with the
default `num_predict` (-1) and context shift on could run for ever, holding a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, TypeVar

from fastapi import Request, Response

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready; the work was cancelled."""


def nobody_listening() -> Response:
    """The answer to a client that left: nothing reads it; the status is for the logs."""
    return Response(status_code=499)


async def unless_disconnected(request: Request | None, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientGone) if the client disconnects first; with
    no `request` (a caller that has no client), just await it. The request's body must have been
    read already: the next ASGI message is then the disconnect."""
    if request is None:
        return await work
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()  # the route itself is being cancelled (a server shutting down): so is its work
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
