"""The one way a route reaches the app's objects (built once at start-up: server/context.py)."""

from __future__ import annotations

from typing import cast

from fastapi import Request

from berth.server.context import AppContext


def app_context(request: Request) -> AppContext:
    """The app's objects; usable as a FastAPI dependency (`Depends(app_context)`) too."""
    return cast(AppContext, request.app.state.context)
