"""Ollama's blobs (HEAD and POST /api/blobs/sha256:<hex>) and /api/create from uploaded files.

The API keeps no blob: it may run on a machine without a model store, beside other replicas.
An upload is streamed, as it arrives, to one live store's file server (workers/peer_server.py,
workers/blobs.py), the one with the most free disk, which checks the digest and keeps the file;
which store holds which blob is in Redis (common/blob_catalog.py), so any replica answers HEAD
and knows where a model can be made from them. /api/create with ``files`` then runs as a store
job on the store that already holds most of the files' bytes; it fetches the rest from the
others. The model made lists, like any model made on one machine, for every machine to fetch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from api import ndjson
from api.answers import ending_in_band
from api.disconnect import StreamedAnswer
from api.dispatch import Dispatcher
from api.model_wire import CreateRequest
from api.file_quota import shown
from common import blob_catalog, keys
from common.blob_catalog import blob_route
from common.catalog import StoreInfo, live_stores
from common.errors import BadRequest, InsufficientStorage, NotFound, Unavailable, Upstream, VllamaError, from_code
from common.uploaded_models import upload_kind

router = APIRouter()

# Per read or write: a store writing a large file may pause; a dead one is noticed.
UPLOAD_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
FORWARD_CHUNK = 256 * 1024  # the client's 32 KiB pieces, gathered before they go on
# The store job's own limit (workers/pull_worker.py), and a little more for the queue.
CREATE_TIMEOUT_S = 6 * 3600 + 60
STATUS_EVERY_S = 10.0  # a status line this often while the store works: clients must not time out
STORE_CHECK_EVERY_S = 5.0


def _dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


@router.head("/api/blobs/{digest}")
async def blob_exists(request: Request, digest: str) -> Response:
    """200 if a live store holds the blob, else Ollama's 404."""
    sha = blob_catalog.parse_digest(digest)
    if not (await blob_catalog.holders(_dispatcher(request).redis, [sha]))[sha]:
        raise NotFound(f'blob "sha256:{sha}" not found')
    return Response(status_code=200)


@router.post("/api/blobs/{digest}")
async def upload_blob(request: Request, digest: str) -> Response:
    """The raw body, streamed to a store: 201 stored, 200 already there, 400 digest mismatch."""
    sha = blob_catalog.parse_digest(digest)
    d = _dispatcher(request)
    if (await blob_catalog.holders(d.redis, [sha]))[sha]:
        await _drain(request)  # read it all, so the client hears the answer rather than a reset
        return Response(status_code=200)
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else None
    store = _roomiest(await live_stores(d.redis), size)
    headers = {"Authorization": f"Bearer {store.token}"}
    if size is not None:
        headers["Content-Length"] = str(size)
    try:
        async with httpx.AsyncClient(timeout=UPLOAD_TIMEOUT) as http:
            answer = await http.put(store.url + blob_route(sha), content=_forwarded(request), headers=headers)
    except ClientDisconnect:
        return Response(status_code=400)  # nobody listens; the store discards what it had
    except httpx.HTTPError as exc:
        raise Unavailable(f"store {store.store_id} stopped answering during the upload ({type(exc).__name__}); "
                          "upload the blob again") from None
    if answer.status_code in (200, 201):
        return Response(status_code=answer.status_code)
    raise _store_error(store, answer)


def _roomiest(stores: list[StoreInfo], size: int | None) -> StoreInfo:
    serving = sorted((s for s in stores if s.url and s.token), key=lambda s: s.free_bytes, reverse=True)
    if not serving:
        raise Unavailable("no model store is running to keep the blob; start a pull worker "
                          "(`vllama pull-worker`, or `vllama serve`), then upload again")
    if size is not None and size > serving[0].free_bytes:
        raise InsufficientStorage(
            f"the blob is {shown(size)}, more than the free space of any model store (at most "
            f"{shown(serving[0].free_bytes)}, on store {serving[0].store_id}); delete models you no longer "
            "need (ollama rm NAME) or give a store a bigger disk (VLLAMA_HOME), then upload again")
    return serving[0]


async def _forwarded(request: Request) -> AsyncIterator[bytes]:
    pending = bytearray()
    async for chunk in request.stream():
        pending += chunk
        if len(pending) >= FORWARD_CHUNK:
            yield bytes(pending)
            pending.clear()
    if pending:
        yield bytes(pending)


async def _drain(request: Request) -> None:
    try:
        async for _ in request.stream():
            pass
    except ClientDisconnect:
        pass


def _store_error(store: StoreInfo, answer: httpx.Response) -> VllamaError:
    try:
        body = answer.json()
        return from_code(body["code"], body["error"])
    except (ValueError, KeyError, TypeError):
        return Upstream(f"store {store.store_id} answered HTTP {answer.status_code} to the upload "
                        f"({answer.text[:200].strip()}); upload the blob again")


# ---------------------------------------------------------------- /api/create with files


async def create_from_files(d: Dispatcher, body: CreateRequest) -> Response:
    """Called by /api/create (api/model_routes.py) when the request has ``files``."""
    name, files = body.uploaded_files()
    kind = upload_kind(files)
    changes = body.changes()
    shas = sorted(set(files.values()))
    held = await blob_catalog.holders(d.redis, shas)
    for path, sha in sorted(files.items()):
        if not held[sha]:
            raise BadRequest(f"blob sha256:{sha} not found; upload it first with POST /api/blobs/sha256:{sha} "
                             f"(the file {path})")
    store_id = _best_store(held)
    job_id = await d.queue.enqueue_store_job(store_id, "create_from_files", name, files, changes)
    first = "parsing GGUF" if kind == "gguf" else "converting model"
    layers = [f"using existing layer sha256:{sha}" for _, sha in sorted(files.items())]
    if changes:
        layer = hashlib.sha256(json.dumps(changes, sort_keys=True).encode()).hexdigest()
        layers.append(f"creating new layer sha256:{layer}")
    waiting = _wait(d, store_id, job_id)
    if not body.stream:
        try:
            async for _ in waiting:
                pass
        finally:
            await waiting.aclose()
        return JSONResponse({"status": "success"})

    async def lines() -> AsyncIterator[bytes]:
        yield ndjson.line({"status": first})
        async for _ in waiting:
            yield ndjson.line({"status": first})
        for status in [*layers, "writing manifest", "success"]:
            yield ndjson.line({"status": status})

    async def relayed() -> AsyncIterator[bytes]:
        try:
            async for chunk in ending_in_band(lines(), ndjson.error_line, retry="create the model again"):
                yield chunk
        finally:
            await waiting.aclose()

    return StreamedAnswer(relayed(), media_type=ndjson.NDJSON)


def _best_store(held: dict[str, list[tuple[StoreInfo, int]]]) -> str:
    """The store already holding the most bytes of the files (fewest to fetch); then the most free."""
    scores: dict[str, tuple[int, int]] = {}
    for found in held.values():
        for store, size in found:
            bytes_held, free = scores.get(store.store_id, (0, store.free_bytes))
            scores[store.store_id] = (bytes_held + size, free)
    return max(scores, key=lambda s: (scores[s], s))


async def _wait(d: Dispatcher, store_id: str, job_id: str) -> AsyncIterator[None]:
    """Until the store job ends: yields every STATUS_EVERY_S meanwhile; raises its failure, or
    Unavailable when the store stops (its record lapses) or the job outlives CREATE_TIMEOUT_S."""
    start = last_status = last_check = time.monotonic()
    gone = 0
    while (info := await d.queue.store_job_result(store_id, job_id)) is None:
        now = time.monotonic()
        if now - start > CREATE_TIMEOUT_S:
            raise Unavailable(f"store {store_id} did not create the model within {CREATE_TIMEOUT_S // 60} minutes; "
                              "see its pull worker's log, then create it again")
        if now - last_check > STORE_CHECK_EVERY_S:
            last_check = now
            gone = 0 if await d.redis.exists(keys.store_record(store_id)) else gone + 1
            if gone >= 2:
                raise Unavailable(f"store {store_id} stopped while creating the model; start its pull worker "
                                  "again, then create the model again (the uploaded files are kept)")
        if now - last_status > STATUS_EVERY_S:
            last_status = now
            yield
        await asyncio.sleep(0.1)
    result = info.result
    if not info.success:
        raise VllamaError(f"store {store_id} could not create the model: {result}")
    if isinstance(result, dict) and result.get("error"):
        raise from_code(str(result.get("code") or "internal"), str(result["error"]))
