"""Managing API keys (admin scope): create, list, revoke."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from berth.registry.keys import KeyStore
from berth.server.api.body import parse_json
from berth.server.api.app_context import app_context

router = APIRouter()


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    scope: str = "read"


class RevokeKey(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


def _keys(request: Request) -> KeyStore:
    return app_context(request).keys


@router.post("/api/keys")
async def create_key(request: Request) -> dict[str, Any]:
    body = await parse_json(request, CreateKey)
    secret, key = await run_in_threadpool(_keys(request).create, body.name, body.scope)
    return {**key.to_json(), "key": secret}


@router.get("/api/keys")
async def list_keys(request: Request) -> dict[str, Any]:
    keys = await run_in_threadpool(_keys(request).list)
    return {"keys": [key.to_json() for key in keys]}


@router.delete("/api/keys")
async def revoke_key(request: Request) -> Response:
    body = await parse_json(request, RevokeKey)
    await run_in_threadpool(_keys(request).revoke, body.name)
    return Response(status_code=200)
