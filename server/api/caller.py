"""Who sent a request, as the auth and metrics middleware recorded it in the request's state."""

from __future__ import annotations

from fastapi import Request

from berth.server.crash_guard import Caller


def caller_of(request: Request) -> Caller:
    state = request.scope.get("state", {})
    return Caller(client=str(state.get("client", "local")), request_id=str(state.get("request_id", "-")))
