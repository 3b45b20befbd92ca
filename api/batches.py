"""OpenAI's Batch API: /v1/batches over the jobs machinery.

Creating a batch reads its input file (JSONL, one request per line), checks the file's shape
(as OpenAI does: a malformed file fails the whole batch, with the line numbers), and queues
each line as a batch-class job carrying its place in the batch. There is no coordinator: the
worker that ends a line records its outcome once (common/batch_lines.py), so the counts are
true while it runs and survive any API replica going away. When every line has an outcome,
whichever replica reads the batch next writes the output and error files (one line per input
line, in input order) and marks it completed. Cancelling withdraws the lines still queued and
aborts the running ones; their outcomes are "cancelled" lines in the error file.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, ValidationError

from api import files, ownership
from api.answers import Answer
from api.dispatch import Dispatcher
from api.embed_models import OpenAIEmbeddingsRequest
from api.embed_routes import embedding_list
from api.errors import describe_validation_error, openai_error
from api.limits import RequestLimits
from api.openai_models import ChatCompletionRequest, CompletionRequest
from api.openai_routes import Shape
from api.tools import attach_tools
from common import batch_lines, clock, keys
from common.batch_lines import LineError, LineOutcome
from common.errors import BadRequest, Conflict, ErrorCode, NotFound, ServerBusy, VllamaError
from common.protocol import BatchRef, DoneFrame, GenerationJob
from common.job_queue import JOB_LOST_MESSAGE, PreparedJob, worker_lost_message
from common.records import BATCH_LINES, BatchLine, BatchRecord, JobRecord
from common.vectors import vectors_of

router = APIRouter(prefix="/v1", tags=["openai batch"])
ENDPOINTS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
             "/v1/embeddings": OpenAIEmbeddingsRequest}
WINDOW_S = 24 * 3600
FINALIZE_LOCK_S = 60
LOST_CHECK_S = 5  # how often a batch's running lines are checked for a dead worker
# Creating a batch of 100,000 lines is seconds of work; other requests must not wait for it.
CHUNK_LINES = 500  # lines written to Redis per round trip
YIELD_EVERY_S = 0.001  # the longest creation works before letting the event loop serve others
MAX_ERRORS = 100  # a malformed file's errors shown in its batch


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None


class InputLine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


# ------------------------------------------------------------------ routes


@router.post("/batches")
async def create_batch(request: Request) -> dict[str, Any]:
    """Create a batch from an uploaded JSONL file (OpenAI's Batch API)."""
    body = CreateBatch.model_validate_json(await request.body() or b"{}")
    if body.endpoint not in ENDPOINTS:
        raise BadRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}, not {body.endpoint!r}")
    await files.own_meta(request, body.input_file_id)  # a batch reads only its own key's files
    return await create(request.app.state.dispatcher, body, ownership.owner_of(request))


@router.get("/batches")
async def list_batches(request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = None
                       ) -> dict[str, Any]:
    """Batches, newest first (?limit=, ?after=)."""
    d: Dispatcher = request.app.state.dispatcher
    ids = [i.decode() if isinstance(i, bytes) else i for i in await d.redis.zrevrange(keys.BATCHES, 0, -1)]
    if after in ids:
        ids = ids[ids.index(after) + 1:]
    principal = ownership.principal_of(request)
    page: list[dict[str, Any]] = []
    more = False
    for batch_id in ids:
        raw = await d.redis.get(keys.batch(batch_id))
        if raw is None or not ownership.can_see(principal, BatchRecord.model_validate_json(raw).owner):
            continue
        if len(page) == limit:
            more = True
            break
        page.append(await read(d, batch_id))
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": more}


@router.get("/batches/{batch_id}")
async def get_batch(request: Request, batch_id: str) -> dict[str, Any]:
    """A batch, with request_counts as of now."""
    await _own(request, batch_id)
    return await read(request.app.state.dispatcher, batch_id)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> dict[str, Any]:
    """Cancel a batch in progress: queued lines leave the queue, running ones are aborted."""
    await _own(request, batch_id)
    return await cancel(request.app.state.dispatcher, batch_id)


async def _own(request: Request, batch_id: str) -> None:
    """A 404, as for an unknown id, unless the request's key may see the batch."""
    batch = await _load(request.app.state.dispatcher, batch_id)
    ownership.require(request, batch.owner, NotFound(f"No batch found with id '{batch_id}'"))


# ------------------------------------------------------------------ creating


async def create(d: Dispatcher, body: CreateBatch, owner: str | None = None) -> dict[str, Any]:
    data = await files.content(d.redis, body.input_file_id)
    now = int(clock.now())
    batch = BatchRecord(id=f"batch_{uuid.uuid4().hex[:24]}", endpoint=body.endpoint,
                        input_file_id=body.input_file_id, completion_window=body.completion_window,
                        created_at=now, in_progress_at=now, expires_at=now + WINDOW_S, metadata=body.metadata,
                        owner=owner)
    lines, errors = await asyncio.to_thread(_parse, data, body.endpoint)  # small steps: the loop runs between
    if errors:
        batch = batch.model_copy(update={"status": "failed", "failed_at": now, "in_progress_at": None,
                                         "errors": {"object": "list", "data": errors}})
    else:
        batch.total = len(lines)
    await _save(d, batch)
    async with d.redis.pipeline(transaction=False) as pipe:
        pipe.zadd(keys.BATCHES, {batch.id: now})
        pipe.zremrangebyscore(keys.BATCHES, "-inf", now - d.settings.file_ttl_s)
        await pipe.execute()
    if not errors:
        await _queue_lines(d, batch, lines)
        # Nothing of a batch just made can be stray yet: spare the check reading every line now.
        await d.redis.set(keys.batch_checked(batch.id), "1", ex=LOST_CHECK_S)
    return await read(d, batch.id)


def _parse(data: bytes, endpoint: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The file's lines (their text: parsed objects for every line of a big batch, all alive
    at once, would make the garbage collector's full passes stall the API), or OpenAI-style
    errors naming the lines that are wrong (the first MAX_ERRORS)."""
    lines: list[str] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, text in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = InputLine.model_validate_json(text)
        except ValidationError as exc:
            errors.append(_line_error("invalid_request", describe_validation_error(exc), number))
            continue
        if line.url != endpoint:
            errors.append(_line_error("mismatched_endpoint", f"url {line.url!r} is not the batch's endpoint "
                                                              f"{endpoint!r}", number))
        elif line.custom_id in seen:
            errors.append(_line_error("duplicate_custom_id", f"custom_id {line.custom_id!r} is used twice", number))
        seen.add(line.custom_id)
        lines.append(text)
    if not lines and not errors:
        errors.append(_line_error("empty_file", "the input file has no requests", None))
    return lines, errors[:MAX_ERRORS]


def _line_error(code: str, message: str, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


async def _queue_lines(d: Dispatcher, batch: BatchRecord, lines: list[str]) -> None:
    """Each line as a batch-class job; a line that cannot run gets its error outcome. The
    lines' list is written before any outcome or job: a batch whose lines all end at once must
    find it when its files are written. Jobs and outcomes go to Redis CHUNK_LINES at a time,
    and the event loop is let go every YIELD_EVERY_S, so the API keeps answering meanwhile.
    What is kept of each line until then is strings and numbers (the entry's JSON, the job's
    enqueue arguments), which the garbage collector does not scan."""
    listed: list[bytes] = []  # the lines' list, each entry's JSON
    queued: list[tuple[int, PreparedJob]] = []
    unrunnable: list[tuple[int, int, str, str]] = []  # index, HTTP status, code, message
    models: dict[str, VllamaError | None] = {}  # each model is checked once
    pace = _Pace()
    for index, text in enumerate(lines):
        await pace()
        line = InputLine.model_validate_json(text)  # checked by _parse
        ref = BatchRef(batch_id=batch.id, index=index, ttl_s=d.settings.file_ttl_s)
        shown = line.body.get("model")
        entry = BatchLine(custom_id=line.custom_id, shown_model=shown if isinstance(shown, str) else None,
                          base64=line.body.get("encoding_format") == "base64")
        try:
            job = await _job(d, batch.endpoint, line, ref, models)
        except VllamaError as exc:
            unrunnable.append((index, exc.status, exc.code, exc.message))
        else:
            entry.job_id, entry.model = job.job_id, job.model
            job.owner = batch.owner  # its tokens count towards the key's usage
            queued.append((index, d.queue.prepare(job, d.settings.max_batch_queue)))
        listed.append(entry.model_dump_json().encode())
    await d.redis.set(keys.batch_lines(batch.id), b"[" + b",".join(listed) + b"]", ex=d.settings.file_ttl_s)
    for start in range(0, len(unrunnable), CHUNK_LINES):
        await _fail_lines(d, batch, unrunnable[start:start + CHUNK_LINES])
    for start in range(0, len(queued), CHUNK_LINES):
        chunk = queued[start:start + CHUNK_LINES]
        problems = await d.queue.enqueue_many([job for _, job in chunk])
        await _fail_lines(d, batch, [(index, p.status, p.code, p.message) for (index, _), problem
                                     in zip(chunk, problems) if (p := _queue_problem(problem)) is not None])
        await pace()


def _queue_problem(problem: VllamaError | None) -> VllamaError | None:
    if isinstance(problem, ServerBusy):
        return VllamaError("the batch queue is full (VLLAMA_MAX_BATCH_QUEUE); submit the rest later",
                           ErrorCode.SERVER_BUSY)
    return problem


class _Pace:
    """Lets the event loop run other tasks once YIELD_EVERY_S has passed since it last did."""

    def __init__(self) -> None:
        self.since = time.monotonic()

    async def __call__(self) -> None:
        if time.monotonic() - self.since >= YIELD_EVERY_S:
            await asyncio.sleep(0)
            self.since = time.monotonic()


async def _fail_lines(d: Dispatcher, batch: BatchRecord, failures: list[tuple[int, int, str, str]]) -> None:
    await batch_lines.record_many(d.redis, [
        (BatchRef(batch_id=batch.id, index=index, ttl_s=d.settings.file_ttl_s),
         LineOutcome(status="failed", error=LineError(status=status, code=code, message=message)))
        for index, status, code, message in failures])


async def _job(d: Dispatcher, endpoint: str, line: InputLine, ref: BatchRef,
               models: dict[str, VllamaError | None]) -> GenerationJob:
    try:
        request = ENDPOINTS[endpoint].model_validate(line.body)
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None
    if isinstance(request, OpenAIEmbeddingsRequest):
        job = request.to_job(RequestLimits.of(d.settings))
    elif request.choices_per_prompt() != 1:
        raise BadRequest("n must be 1 in a batch; repeat the line with other custom_ids for more choices")
    elif isinstance(request, ChatCompletionRequest):
        job = request.to_job(RequestLimits.of(d.settings))
        await attach_tools(d, job, request.model, request.tools, request.tool_choice, request.parallel_tool_calls)
    else:
        jobs = request.to_jobs(RequestLimits.of(d.settings))
        if len(jobs) != 1:
            raise BadRequest("prompt must be one string in a batch line; put each prompt on its own line")
        job = jobs[0]
    if job.model not in models:
        models[job.model] = await _model_problem(d, job.model)
    if (problem := models[job.model]) is not None:
        raise problem
    await d.with_model_defaults(job)
    job.priority, job.stream, job.batch = "batch", False, ref
    return job


async def _model_problem(d: Dispatcher, model: str) -> VllamaError | None:
    """Why ``model`` cannot be had (404), or None. With no worker up, lines wait for one."""
    try:
        await d.ensure_servable(model)
    except VllamaError as exc:
        return exc
    return None


# ------------------------------------------------------------------ reading, finishing, cancelling


async def _save(d: Dispatcher, batch: BatchRecord) -> None:
    await d.redis.set(keys.batch(batch.id), batch.model_dump_json(), ex=d.settings.file_ttl_s)


async def _load(d: Dispatcher, batch_id: str) -> BatchRecord:
    raw = await d.redis.get(keys.batch(batch_id))
    if raw is None:
        raise NotFound(f"No batch found with id '{batch_id}'")
    return BatchRecord.model_validate_json(raw)


async def _lines(d: Dispatcher, batch_id: str) -> list[BatchLine]:
    return BATCH_LINES.validate_json(await d.redis.get(keys.batch_lines(batch_id)) or "[]")


async def read(d: Dispatcher, batch_id: str) -> dict[str, Any]:
    """The batch as OpenAI shows it, with live counts; finished (files written) if every line
    has an outcome."""
    batch = await _load(d, batch_id)
    if batch.status == "in_progress" and clock.now() > batch.expires_at:
        batch = await _stop(d, batch, expired=True)
    completed, failed = await _counts(d, batch_id)
    if batch.open and completed + failed < batch.total and await _settle_stray_lines(d, batch_id):
        completed, failed = await _counts(d, batch_id)
    if batch.open and completed + failed >= batch.total:
        batch = await _finish(d, batch)
    return batch.shown(completed, failed)


async def _counts(d: Dispatcher, batch_id: str) -> tuple[int, int]:
    completed, failed = await d.redis.hmget(keys.batch_counts(batch_id), "completed", "failed")
    return int(completed or 0), int(failed or 0)


async def _settle_stray_lines(d: Dispatcher, batch_id: str) -> bool:
    """Lines that will never record an outcome themselves, settled here (at most one look
    every few seconds per batch): one whose worker died while running it (failed), and one
    that arq ended without running it, as when an abort arrives just as a worker takes the
    job (cancelled). True if any was settled."""
    if not await d.redis.set(keys.batch_checked(batch_id), "1", nx=True, ex=LOST_CHECK_S):
        return False
    ended = {int(k) for k in await d.redis.hkeys(keys.batch_results(batch_id))}
    pending = [(i, e) for i, e in enumerate(await _lines(d, batch_id)) if i not in ended and e.job_id]
    if not pending:
        return False
    records = await d.redis.mget([keys.job_record(e.job_id) for _, e in pending])
    ended_unrun = await d.queue.ended_unrun([e.job_id for _, e in pending])
    settled = False
    for (index, entry), raw, unrun in zip(pending, records, ended_unrun):
        record = JobRecord.model_validate_json(raw) if raw else None
        ref = BatchRef(batch_id=batch_id, index=index, ttl_s=d.settings.file_ttl_s)
        if unrun and (record is None or record.status == "queued"):
            settled |= await batch_lines.record(d.redis, ref, LineOutcome(status="cancelled", job_id=entry.job_id))
        elif record is not None and (lost := await d.queue.settle_lost(record) or _lost_already(record)):
            settled |= await batch_lines.record(d.redis, ref, LineOutcome(
                status="failed", job_id=entry.job_id, error=LineError(
                    status=500, code=ErrorCode.WORKER_LOST, message=lost.error or "")))
    return settled


def _lost_already(record: JobRecord) -> JobRecord | None:
    """A line's job that the API's sweep already failed for its dead worker, which had started
    it or only taken it (the worker never recorded the line's outcome)."""
    lost = (worker_lost_message(record.worker_id), JOB_LOST_MESSAGE)
    return record if record.status == "failed" and record.error in lost else None


async def _finish(d: Dispatcher, batch: BatchRecord) -> BatchRecord:
    """Write the output and error files; one replica does it (a lock), the others see the result."""
    if not await d.redis.set(keys.batch_finishing(batch.id), "1", nx=True, ex=FINALIZE_LOCK_S):
        return batch
    raw = await d.redis.hgetall(keys.batch_results(batch.id))
    outcomes = {int(k): LineOutcome.model_validate_json(v) for k, v in raw.items()}
    kind = "chat" if batch.endpoint == "/v1/chat/completions" else "completion"
    embeddings = batch.endpoint == "/v1/embeddings"
    output, error = [], []
    for index, entry in enumerate(await _lines(d, batch.id)):
        outcome = outcomes[index]
        line = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": entry.custom_id, "response": None,
                "error": None}
        if outcome.status == "done" and outcome.result is not None:
            r = outcome.result
            if embeddings:
                body = embedding_list(vectors_of(r.vectors), entry.shown_model or "", r.stats.prompt_eval_count,
                                      entry.base64)
            else:
                answer = Answer(r.text, DoneFrame(seq=0, done_reason=r.done_reason, stats=r.stats), r.tool_calls,
                                r.logprobs, thinking=r.thinking)
                body = Shape(kind, outcome.job_id or "", entry.shown_model or "", 1).whole([answer])
            line["response"] = {"status_code": 200, "request_id": outcome.job_id, "body": body}
            output.append(line)
        elif outcome.status == "cancelled" and batch.expiring:
            line["error"] = {"code": "batch_expired", "message": "the batch's 24 h window ended before this request did"}
            error.append(line)
        elif outcome.status == "cancelled":
            line["error"] = {"code": "batch_cancelled", "message": "the batch was cancelled before this request ended"}
            error.append(line)
        else:
            e = outcome.error or LineError(status=500, code="internal", message="the request failed")
            line["response"] = {"status_code": e.status, "request_id": outcome.job_id,
                                "body": openai_error(e.message, e.status, e.code)}
            error.append(line)
    now = int(clock.now())
    if output:
        batch.output_file_id = (await files.save(d.redis, d.settings, _jsonl(output), f"{batch.id}_output.jsonl",
                                                 "batch_output", owner=batch.owner))["id"]
    if error:
        batch.error_file_id = (await files.save(d.redis, d.settings, _jsonl(error), f"{batch.id}_error.jsonl",
                                                "batch_output", owner=batch.owner))["id"]
    if batch.status == "cancelling" and batch.expiring:
        batch.status, batch.expired_at = "expired", now
    elif batch.status == "cancelling":
        batch.status, batch.cancelled_at = "cancelled", now
    else:
        batch.status, batch.finalizing_at, batch.completed_at = "completed", now, now
    await _save(d, batch)
    return batch


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    # orjson: UTF-8 as is, and embeddings' float32 numbers as short as they need.
    return b"".join(orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for line in lines)


async def cancel(d: Dispatcher, batch_id: str) -> dict[str, Any]:
    batch = await _load(d, batch_id)
    if batch.status != "in_progress":
        raise Conflict(f"batch {batch_id} is {batch.status}; only a batch in progress can be cancelled")
    await _stop(d, batch, expired=False)
    return await read(d, batch_id)


async def _stop(d: Dispatcher, batch: BatchRecord, expired: bool) -> BatchRecord:
    """Cancel, or expire (its window passed): the lines still queued leave the queue, the
    running ones are aborted in their workers, which record them."""
    batch.status, batch.cancelling_at, batch.expiring = "cancelling", int(clock.now()), expired
    await _save(d, batch)
    ended = {int(k) for k in await d.redis.hkeys(keys.batch_results(batch.id))}
    for index, entry in enumerate(await _lines(d, batch.id)):
        if index in ended or entry.job_id is None or entry.model is None:
            continue
        if await d.queue.withdraw(keys.batch_queue(entry.model), entry.job_id):
            ref = BatchRef(batch_id=batch.id, index=index, ttl_s=d.settings.file_ttl_s)
            await batch_lines.record(d.redis, ref, LineOutcome(status="cancelled", job_id=entry.job_id))
        else:  # running: its worker aborts it and records the outcome
            await d.queue.abort(entry.job_id)
    return batch
