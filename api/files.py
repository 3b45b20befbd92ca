"""OpenAI's Files API, for batch input and output: /v1/files.

Files live in Redis, beside everything else, so any API replica can serve them and no shared
disk is needed: ``vllama:file:<id>`` holds the bytes, ``vllama:file-meta:<id>`` OpenAI's file
object, for VLLAMA_FILE_TTL_S (30 days, as OpenAI keeps batch files).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response
from redis.asyncio import Redis

from api import ownership
from common import clock, keys
from common.errors import BadRequest, NotFound
from common.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai batch"])
MAX_FILE_BYTES = 200 * 1024 * 1024  # OpenAI's limit for batch input files
PURPOSES = ("batch", "batch_output", "assistants", "fine-tune", "vision", "user_data", "evals")


async def save(redis: Redis, settings: Settings, content: bytes, filename: str, purpose: str,
               owner: str | None = None) -> dict[str, Any]:
    now = int(clock.now())
    meta = {"id": f"file-{uuid.uuid4().hex[:24]}", "object": "file", "bytes": len(content), "created_at": now,
            "expires_at": now + settings.file_ttl_s, "filename": filename, "purpose": purpose,
            "status": "processed", "status_details": None}
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.file_content(meta["id"]), content, ex=settings.file_ttl_s)
        pipe.set(keys.file_meta(meta["id"]), json.dumps({**meta, "owner": owner}), ex=settings.file_ttl_s)
        pipe.zadd(keys.FILES, {meta["id"]: now})
        pipe.zremrangebyscore(keys.FILES, "-inf", now - settings.file_ttl_s)
        await pipe.execute()
    return meta


async def meta(redis: Redis, file_id: str) -> dict[str, Any]:
    raw = await redis.get(keys.file_meta(file_id))
    if raw is None:
        raise NotFound(f"No such File object: {file_id}")
    return json.loads(raw)


def shown(meta: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's file object: the stored meta without its owner (api/ownership.py)."""
    return {k: v for k, v in meta.items() if k != "owner"}


async def own_meta(request: Request, file_id: str) -> dict[str, Any]:
    """The file's stored meta, if the request's key may see it; else the 404 an unknown id gets."""
    found = await meta(request.app.state.dispatcher.redis, file_id)
    ownership.require(request, found.get("owner"), NotFound(f"No such File object: {file_id}"))
    return found


async def content(redis: Redis, file_id: str) -> bytes:
    data = await redis.get(keys.file_content(file_id))
    if data is None:
        raise NotFound(f"No such File object: {file_id}")
    return data


@router.post("/files")
async def upload(request: Request, file: UploadFile = File(...), purpose: str = Form(...)) -> dict[str, Any]:
    if purpose not in PURPOSES:
        raise BadRequest(f"purpose must be one of {', '.join(PURPOSES)}; send purpose=batch for batch input")
    data = await file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise BadRequest(f"the file is larger than {MAX_FILE_BYTES // 2**20} MiB; split it into several batches")
    dispatcher = request.app.state.dispatcher
    return await save(dispatcher.redis, dispatcher.settings, data, file.filename or "upload", purpose,
                      owner=ownership.owner_of(request))


@router.get("/files")
async def list_files(request: Request, purpose: str | None = None) -> dict[str, Any]:
    redis = request.app.state.dispatcher.redis
    ids = [i.decode() if isinstance(i, bytes) else i for i in await redis.zrevrange(keys.FILES, 0, -1)]
    raws = await redis.mget([keys.file_meta(i) for i in ids]) if ids else []
    principal = ownership.principal_of(request)
    files = [json.loads(r) for r in raws if r is not None]
    return {"object": "list", "has_more": False,
            "data": [shown(f) for f in files
                     if purpose in (None, f["purpose"]) and ownership.can_see(principal, f.get("owner"))]}


@router.get("/files/{file_id}")
async def get_file(request: Request, file_id: str) -> dict[str, Any]:
    return shown(await own_meta(request, file_id))


@router.get("/files/{file_id}/content")
async def get_content(request: Request, file_id: str) -> Response:
    await own_meta(request, file_id)
    return Response(await content(request.app.state.dispatcher.redis, file_id), media_type="application/octet-stream")


@router.delete("/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    redis = request.app.state.dispatcher.redis
    await own_meta(request, file_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.file_content(file_id), keys.file_meta(file_id))
        pipe.zrem(keys.FILES, file_id)
        await pipe.execute()
    return {"id": file_id, "object": "file", "deleted": True}
