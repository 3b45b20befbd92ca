"""The jobs API: submit a generate, chat or pull body and come back for the answer.

    POST   /api/jobs/generate, /api/jobs/chat   202 and the job (same bodies as /api/generate
                                                and /api/chat, plus "priority")
    POST   /api/jobs/pull                       202 and the job: the pull runs on every store
    GET    /api/jobs                            recent jobs, newest first (?limit=, ?status=)
    GET    /api/jobs/{id}                       status, output so far, result when done
    GET    /api/jobs/{id}/stream                the answer as NDJSON, from the start, live
    DELETE /api/jobs/{id}                       cancel a queued or running job
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from api import jobs, ndjson, ownership
from api.answers import ending_in_band, singly
from api.disconnect import StreamedAnswer
from api.dispatch import Dispatcher
from api.errors import parse_body
from api.limits import RequestLimits
from api.model_routes import pull_response
from api.model_wire import PullRequest
from api.ollama_models import ChatRequest, GenerateRequest
from api.ollama_routes import ndjson_answer
from api.tools import attach_tools
from common.errors import BadRequest
from common.records import FINISHED

router = APIRouter(prefix="/api/jobs", tags=["jobs"])
Priority = Literal["interactive", "batch"]


class AsyncGenerateRequest(GenerateRequest):
    priority: Priority = "batch"


class AsyncChatRequest(ChatRequest):
    priority: Priority = "batch"


@router.post("/generate", status_code=202)
async def submit_generate(request: Request) -> JSONResponse:
    """Submit an /api/generate body (plus "priority": "batch" or "interactive") as an async
    job; answers 202 with the job at once."""
    return await _submit(request, await parse_body(request, AsyncGenerateRequest))


@router.post("/chat", status_code=202)
async def submit_chat(request: Request) -> JSONResponse:
    """Submit an /api/chat body (plus "priority") as an async job; answers 202 with the job."""
    return await _submit(request, await parse_body(request, AsyncChatRequest))


async def _submit(request: Request, body: AsyncGenerateRequest | AsyncChatRequest) -> JSONResponse:
    dispatcher: Dispatcher = request.app.state.dispatcher
    if body.is_load_only():
        raise BadRequest("an async job needs a prompt (or messages); to load a model, use /api/generate")
    job = body.to_job(RequestLimits.of(dispatcher.settings))
    job.priority = body.priority
    headers = await attach_tools(dispatcher, job, body.model, body.tools) if isinstance(body, ChatRequest) else {}
    ownership.stamp(request, [job])
    record = await jobs.submit(dispatcher, job, body.keep_alive_s())
    return JSONResponse(_job_json(jobs.JobState(record)), status_code=202, headers=headers)


@router.post("/pull", status_code=202)
async def submit_pull(request: Request) -> JSONResponse:
    """Start (or join) the pull of {"model": ...} on every store; answers 202 with the job."""
    body = await parse_body(request, PullRequest)
    record = await jobs.submit_pull(request.app.state.dispatcher, body.canonical(), ownership.owner_of(request))
    return JSONResponse(_job_json(jobs.JobState(record)), status_code=202)


@router.get("")
async def list_jobs(request: Request, limit: int = Query(50, ge=1, le=1000),
                    status: str | None = None) -> dict[str, Any]:
    """Recent jobs, newest first; ?status= keeps one status (queued, running, done, failed, cancelled)."""
    dispatcher: Dispatcher = request.app.state.dispatcher
    principal = ownership.principal_of(request)
    states = [jobs.JobState(*await jobs.pull_progress(dispatcher, r)) if r.kind == "pull" else jobs.JobState(r)
              for r in await jobs.recent(dispatcher, limit, lambda r: ownership.can_see(principal, r.owner))]
    return {"jobs": [_job_json(s) for s in states if status in (None, s.record.status)]}


@router.get("/{job_id}")
async def get_job(request: Request, job_id: str) -> dict[str, Any]:
    """A job's status, output so far, and once done the result the synchronous endpoint gives."""
    return _job_json(await _read_own(request, job_id), full=True)


@router.get("/{job_id}/stream")
async def stream_job(request: Request, job_id: str) -> Response:
    """The job's answer as NDJSON, as the synchronous endpoint streams it: from the start, then live."""
    dispatcher: Dispatcher = request.app.state.dispatcher
    state = await _read_own(request, job_id)  # a 404 before the stream starts
    record = state.record
    if record.kind == "pull":  # the pull's progress lines, joining it (or re-checking it, if done)
        return await pull_response(dispatcher, record.model, stream=True)
    return StreamedAnswer(_relay(dispatcher, job_id, record.model, record.kind), media_type=ndjson.NDJSON)


@router.delete("/{job_id}")
async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    """Cancel a queued or running job (409 once it has ended; a pull cannot be cancelled)."""
    dispatcher: Dispatcher = request.app.state.dispatcher
    await _read_own(request, job_id)
    await jobs.cancel(dispatcher, job_id)
    return _job_json(await jobs.read(dispatcher, job_id))


async def _read_own(request: Request, job_id: str) -> jobs.JobState:
    """The job, if the request's key may see it; else the 404 an unknown id gets."""
    dispatcher: Dispatcher = request.app.state.dispatcher
    state = await jobs.read(dispatcher, job_id)
    ownership.require(request, state.record.owner, jobs.job_not_found(job_id, dispatcher.settings.keep_result_s))
    return state


async def _relay(dispatcher: Dispatcher, job_id: str, model: str, kind: str) -> AsyncIterator[bytes]:
    """The job's answer as /api/generate or /api/chat would stream it."""
    async for line in ending_in_band(ndjson_answer(model, kind, singly(jobs.follow(dispatcher, job_id))),
                                     ndjson.error_line):
        yield line


def _job_json(state: jobs.JobState, full: bool = False) -> dict[str, Any]:
    """A job as the jobs API shows it; ``full`` adds the output so far and, once it is done,
    the result: the object /api/generate or /api/chat answers with "stream": false."""
    r = state.record
    status = "done" if state.done is not None else "failed" if state.error is not None else r.status
    body: dict[str, Any] = {
        "id": r.job_id, "type": r.kind, "model": r.model, "status": status,
        "priority": r.priority,
        "created_at": _time(r.created_at), "started_at": _time(r.started_at),
        "finished_at": _time(r.updated_at) if status in FINISHED else None,
        "worker_id": r.worker_id,
        "error": state.error.message if state.error is not None else r.error,
    }
    if r.route is not None:  # where the API sent it, and why (api/routing.py)
        body["route"] = {"worker_id": r.route.worker_id, "reason": r.route.reason,
                         "prefix_chars": r.route.prefix_chars}
    if r.kind == "pull":
        pull = state.pull or jobs.PullProgress()
        body.update(stores=r.stores, completed=pull.completed, total=pull.total)
        return body
    if full:
        body["output"] = state.text
        if state.thinking:
            body["thinking"] = state.thinking
        if state.tool_calls:
            body["tool_calls"] = ndjson.tool_calls_json(state.tool_calls)
        if state.done is not None:
            body["result"] = ndjson.generate_final(r.model, state.done, state.text, state.logprobs, state.thinking) \
                if r.kind == "generate" else \
                ndjson.chat_final(r.model, state.done, state.text, state.tool_calls, state.logprobs, state.thinking)
    return body


def _time(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
