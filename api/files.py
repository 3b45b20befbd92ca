"""OpenAI's Files API, for batch input and output: /v1/files.

Files live in Redis, beside everything else, so any API replica can serve them and no shared
disk is needed: ``vllama:file:<id>`` holds the bytes, ``vllama:file-meta:<id>`` OpenAI's file
object, for VLLAMA_FILE_TTL_S (30 days, as OpenAI keeps batch files). An upload is read from
the request stream and counted as it comes (api/uploads.py); it is stored only if it fits
under VLLAMA_MAX_UPLOAD_BYTES and the total under VLLAMA_MAX_FILE_STORAGE_BYTES
(api/file_quota.py), which batch output files count towards but are never refused by.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from redis.asyncio import Redis

from api import file_quota, ownership
from api.uploads import least_file_bytes, read_upload, refuse_early
from common import clock, keys
from common.errors import BadRequest, NotFound, TooLarge
from common.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai batch"])
PURPOSES = ("batch", "batch_output", "assistants", "fine-tune", "vision", "user_data", "evals")


async def save(redis: Redis, settings: Settings, content: bytes | bytearray, filename: str, purpose: str,
               owner: str | None = None) -> dict[str, Any]:
    """Store a file if it fits in VLLAMA_MAX_FILE_STORAGE_BYTES (TooLarge if not); a batch's
    output (purpose batch_output) is always stored, and counted."""
    now = int(clock.now())
    meta = {"id": f"file-{uuid.uuid4().hex[:24]}", "object": "file", "bytes": len(content), "created_at": now,
            "expires_at": now + settings.file_ttl_s, "filename": filename, "purpose": purpose,
            "status": "processed", "status_details": None}
    limit = settings.max_file_storage_bytes
    reserved = await file_quota.reserve(redis, meta["id"], len(content), meta["expires_at"], now, limit,
                                        force=purpose == "batch_output")
    if not reserved.granted:
        raise storage_full(reserved.used, limit, f"this file is {file_quota.shown(len(content))}")
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.file_content(meta["id"]), memoryview(content), ex=settings.file_ttl_s)
            pipe.set(keys.file_meta(meta["id"]), json.dumps({**meta, "owner": owner}), ex=settings.file_ttl_s)
            pipe.zadd(keys.FILES, {meta["id"]: now})
            pipe.zremrangebyscore(keys.FILES, "-inf", now - settings.file_ttl_s)
            await pipe.execute()
    except BaseException:
        await file_quota.release(redis, meta["id"])
        raise
    return meta


def storage_full(used: int, limit: int, needed: str) -> TooLarge:
    return TooLarge(f"file storage is full: {file_quota.shown(used)} of VLLAMA_MAX_FILE_STORAGE_BYTES "
                    f"({file_quota.shown(limit)}) is used and {needed}; delete files you no longer need "
                    "(DELETE /v1/files/{file_id}) or raise VLLAMA_MAX_FILE_STORAGE_BYTES on the server")


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


@router.post("/files")  # its form is described in api/openapi_bodies.py
async def upload(request: Request) -> dict[str, Any]:
    """Upload a file (multipart/form-data: file, purpose), at most VLLAMA_MAX_UPLOAD_BYTES."""
    dispatcher = request.app.state.dispatcher
    redis, settings = dispatcher.redis, dispatcher.settings
    refuse_early(request, settings.max_upload_bytes)
    if least := least_file_bytes(request):  # no room: say so now, not after the whole upload
        used = await file_quota.used_now(redis, clock.now())
        if used + least > settings.max_file_storage_bytes:
            raise storage_full(used, settings.max_file_storage_bytes,
                               f"this upload is at least {file_quota.shown(least)}")
    form = await read_upload(request, settings.max_upload_bytes)
    purpose = form.fields.get("purpose")
    if purpose not in PURPOSES:
        raise BadRequest(f"purpose must be one of {', '.join(PURPOSES)}; send purpose=batch for batch input")
    if not form.has_file:
        raise BadRequest("the upload has no `file` field; send the file as multipart/form-data field `file`")
    return await save(redis, settings, form.content, form.filename or "upload", purpose,
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
    await file_quota.release(redis, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
