"""server/api/disconnect.py: work for a non-streaming answer stops with its client or its route."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from berth.server.api.disconnect import ClientGone, unless_disconnected


class Client:
    """The ASGI side of a request whose body was read: `receive` answers only when the client
    leaves (a stand-in for uvicorn's, which the live-server tests exercise)."""

    def __init__(self, leaves_after: asyncio.Event | None) -> None:
        self.leaves_after = leaves_after

    async def receive(self) -> dict[str, Any]:
        if self.leaves_after is None:
            await asyncio.sleep(3600)
        else:
            await self.leaves_after.wait()
        return {"type": "http.disconnect"}


def test_work_stops_when_its_client_leaves_or_its_route_is_cancelled() -> None:
    async def scenario() -> None:
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def work() -> None:
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with pytest.raises(ClientGone):
            await unless_disconnected(Client(started), work())  # type: ignore[arg-type]
        assert cancelled.is_set()

        started.clear()
        cancelled.clear()
        route = asyncio.ensure_future(unless_disconnected(Client(None), work()))  # type: ignore[arg-type]
        await started.wait()
        route.cancel()  # a server shutting down cancels the route: its work goes with it
        with contextlib.suppress(asyncio.CancelledError):
            await route
        await asyncio.sleep(0)
        assert cancelled.is_set()

        async def answer() -> int:
            return 42

        assert await unless_disconnected(Client(None), answer()) == 42  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await unless_disconnected(Client(None), _fails())  # type: ignore[arg-type]
        assert await unless_disconnected(None, answer()) == 42

    asyncio.run(scenario())


async def _fails() -> None:
    raise ValueError("the work's own error comes through")
