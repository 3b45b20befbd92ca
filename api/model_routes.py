"""Ollama's model management: /api/pull, /api/tags, /api/show, /api/ps, /api/delete, /api/copy,
/api/create.

Models live on the stores' disks (one per machine); the API reads what they hold from Redis
(common/catalog.py) and asks them to change it through their job queues, so any API replica
can manage models on every machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api import ndjson
from api.blob_routes import create_from_files
from api.disconnect import StreamedAnswer
from api.dispatch import Dispatcher
from api.errors import parse_body
from api.model_wire import (CopyRequest, CreateRequest, DeleteRequest, PullRequest, PushRequest, ShowRequest,
                            ps_entries, show_body, tag_entry)
from api.pulls import PullLines, follow_pull
from api.pushes import push_response
from common import catalog
from common.errors import BadRequest, ModelNotFound, Unavailable, VllamaError
from common.models import source_for

log = logging.getLogger(__name__)
router = APIRouter()
STORE_JOB_TIMEOUT_S = 120


def _dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    body = await parse_body(request, PullRequest)
    return await pull_response(_dispatcher(request), body.canonical(), body.stream)


async def pull_response(d: Dispatcher, model: str, stream: bool) -> Response:
    """Start or join the pull of ``model``; Ollama's progress lines, or one object at the end."""
    states = follow_pull(d.redis, d.mux, d.settings, model)
    lines = PullLines()
    first = await anext(states)  # errors before anything is under way get a real status
    if not stream:
        try:
            async for state in _from(first, states):
                lines.lines(state)
                if lines.error:
                    raise lines.error
        finally:
            await states.aclose()
        return JSONResponse({"status": "success"})
    return StreamedAnswer(ndjson.relay_progress(lines, states, "pull again", lines.lines(first)),
                             media_type=ndjson.NDJSON)


async def _from(first: dict, rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    yield first
    async for item in rest:
        yield item


@router.head("/api/tags", include_in_schema=False)
@router.get("/api/tags")
async def tags(request: Request) -> dict:
    d = _dispatcher(request)
    entries = await catalog.entries(d.redis)
    ordered = sorted(entries.values(), key=lambda e: e.manifest.modified_at, reverse=True)
    return {"models": [tag_entry(e) for e in ordered]}


@router.post("/api/show")
async def show(request: Request) -> dict:
    body = await parse_body(request, ShowRequest)
    model = body.canonical()
    d = _dispatcher(request)
    entry = await catalog.lookup(d.redis, model)
    if entry is None:
        raise ModelNotFound(model, f"model '{model}' not found")
    tensors = None
    if body.verbose:  # read from the weights' headers by a store that holds them
        tensors = (await _on_stores(d, entry.stores[:1], "tensors", entry.manifest.name))[0]
    return show_body(entry.manifest, tensors)


@router.get("/api/ps")
async def ps(request: Request) -> dict:
    d = _dispatcher(request)
    workers = await d.live_workers(fresh=True)
    entries = await catalog.entries(d.redis)
    return {"models": ps_entries(workers, entries)}


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    body = await parse_body(request, DeleteRequest)
    try:
        model = body.canonical()
    except BadRequest:
        raise BadRequest(f'name "{body.model}" is invalid') from None
    d = _dispatcher(request)
    entry = await catalog.lookup(d.redis, model)
    if entry is None:
        # Listed nowhere; but a pull from the Hub that failed or was interrupted may have left
        # files on a store, and this is how they are removed: every live store looks for them.
        source = source_for(model)
        if source is None or source.bundled:
            raise ModelNotFound(model, f"model '{model}' not found")
        stores = sorted(s.store_id for s in await catalog.live_stores(d.redis))
        results = await _on_stores(d, stores, "delete", model)
        if not any(isinstance(r, dict) and r.get("leftovers") for r in results):
            raise ModelNotFound(model, f"model '{model}' not found")
        return Response(status_code=200)
    model = entry.manifest.name  # the spelling the stores keep (a repo id matches in any case)
    # Workers holding it unload it as soon as it is idle.
    await d.loader.set_keep_alive(model, 0.0)
    await _on_stores(d, entry.stores, "delete", model)
    return Response(status_code=200)


@router.post("/api/copy")
async def copy(request: Request) -> Response:
    source, destination = (await parse_body(request, CopyRequest)).names()
    d = _dispatcher(request)
    entry = await catalog.lookup(d.redis, source)
    if entry is None:
        raise ModelNotFound(source, f'model "{source}" not found')
    await _on_stores(d, entry.stores, "copy", source, destination)
    return Response(status_code=200)


@router.post("/api/create")
async def create(request: Request) -> Response:
    """A model made from an existing one: its files shared (as a copy), its description given
    the request's system prompt, parameters, messages and license, on every store that holds
    the source. Ollama's status lines, or one object with "stream": false."""
    body = await parse_body(request, CreateRequest)
    if body.files:  # from uploaded files instead (api/blob_routes.py)
        return await create_from_files(_dispatcher(request), body)
    source, destination = body.names()
    changes = body.changes()
    d = _dispatcher(request)
    entry = await catalog.lookup(d.redis, source)
    if entry is None:
        raise ModelNotFound(source, f'model "{source}" not found')
    await _on_stores(d, entry.stores, "create", source, destination, changes)
    layer = hashlib.sha256(json.dumps(changes, sort_keys=True).encode()).hexdigest()
    lines = [f"using existing layer sha256:{entry.manifest.digest}"]
    if changes:
        lines.append(f"creating new layer sha256:{layer}")
    lines += ["writing manifest", "success"]
    if not body.stream:
        return JSONResponse({"status": "success"})
    return Response(b"".join(ndjson.line({"status": status}) for status in lines), media_type=ndjson.NDJSON)


async def _on_stores(d: Dispatcher, stores: list[str], function: str, *args: str) -> list[object]:
    """Run a store job on each store and wait for all: every machine changes, or the
    request fails saying which did not. Returns each store's result."""
    jobs = [(store_id, await d.queue.enqueue_store_job(store_id, function, *args)) for store_id in stores]
    deadline = time.monotonic() + STORE_JOB_TIMEOUT_S
    results = []
    for store_id, job_id in jobs:
        while (info := await d.queue.store_job_result(store_id, job_id)) is None:
            if time.monotonic() > deadline:
                raise Unavailable(f"store {store_id} did not {function} the model within "
                                  f"{STORE_JOB_TIMEOUT_S} s; is its pull worker running?")
            await asyncio.sleep(0.05)
        if not info.success:
            reason = info.result.get("error") if isinstance(info.result, dict) else info.result
            raise VllamaError(f"store {store_id} could not {function} the model: {reason}")
        results.append(info.result)
    return results


@router.post("/api/push")
async def push(request: Request) -> Response:
    """Upload a model to the Hugging Face repo its name gives (org/name; a tag other than
    latest goes to the branch named after it), from a store that holds it, with the HF_TOKEN
    of that store's pull worker. Its files go up unchanged."""
    body = await parse_body(request, PushRequest)
    model, repo, revision = body.target()
    d = _dispatcher(request)
    entry = await catalog.lookup(d.redis, model)
    if entry is None:
        raise ModelNotFound(model, f"model '{model.removesuffix(':latest')}' not found")
    # A store holding exactly these files and serving them, if any; else any holder.
    store_id = entry.sources[0].store_id if entry.sources else entry.stores[0]
    return await push_response(d, store_id, entry.manifest.name, repo, revision, body.stream)
