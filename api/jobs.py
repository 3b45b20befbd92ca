"""Async jobs: submitted now, answered later.

An async job is a generation job like any other (same queue machinery, same workers) with two
differences: it runs whether or not anyone listens, and the worker keeps its frames in
``vllama:job-frames:<id>`` beside publishing them. So its status, its output so far and its
result can be read at any time from Redis, by any API replica, and a client can attach to its
live stream at any point: the kept frames first, then the live ones (subscribed before the
kept ones are read, so nothing falls in between; duplicates are dropped by sequence number).

By default async jobs are batch class: they wait in the model's batch queue, which workers
serve with fewer slots and vLLM at a lower priority than interactive requests.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from arq.constants import abort_jobs_ss, result_key_prefix
from pydantic import TypeAdapter

from api.admission import DUPLICATE_ID, QUEUE_FULL, enqueue_if_room, forget_job, withdraw
from api.dispatch import Dispatcher
from api.pulls import pull_states, start_pulls
from common import job_records, keys, registry
from common.errors import Conflict, NotFound, ServerBusy, VllamaError, from_code
from common.protocol import (
    DoneFrame,
    ErrorFrame,
    Frame,
    GenerationJob,
    StartFrame,
    TokenFrame,
    TokenLogprob,
    ToolCallsFrame,
)
from common.tool_calls import ToolCall

_frame = TypeAdapter(Frame)
FINISHED = ("done", "failed", "cancelled")


async def submit(dispatcher: Dispatcher, job: GenerationJob, keep_alive: float | None) -> dict[str, Any]:
    """Queue ``job`` to run without a listener; returns its record. A model no worker holds
    is asked for, and with no worker up at all the job simply waits for one."""
    job.stream = False
    await dispatcher.ensure_servable(job.model)
    settings = dispatcher.settings
    limit = settings.max_batch_queue if job.priority == "batch" else settings.max_queue
    outcome = await enqueue_if_room(dispatcher.redis, job, "generate", limit, settings.keep_result_s, keep_alive)
    if outcome == QUEUE_FULL:
        raise ServerBusy()
    if outcome == DUPLICATE_ID:
        raise VllamaError(f"job id {job.job_id} already exists; submit again")
    now_ms = int(time.time() * 1000)
    async with dispatcher.redis.pipeline(transaction=False) as pipe:
        pipe.zadd(keys.JOBS, {job.job_id: now_ms})
        pipe.zremrangebyscore(keys.JOBS, "-inf", now_ms - settings.keep_result_s * 1000)
        await pipe.execute()
    return json.loads(job_records.encode(job, "queued"))


async def submit_pull(dispatcher: Dispatcher, model: str) -> dict[str, Any]:
    """Start (or join) the pull of ``model`` on every live store; the job's record names the
    stores, and its state is read from their pull records."""
    stores = await start_pulls(dispatcher.redis, dispatcher.settings, model)
    now = time.time()
    record = {"job_id": f"pull-{uuid.uuid4().hex}", "model": model, "kind": "pull", "priority": "batch",
              "async": True, "status": "queued", "stores": stores, "created_at": now, "updated_at": now}
    async with dispatcher.redis.pipeline(transaction=False) as pipe:
        pipe.set(keys.job_record(record["job_id"]), json.dumps(record), ex=dispatcher.settings.keep_result_s)
        pipe.zadd(keys.JOBS, {record["job_id"]: int(now * 1000)})
        await pipe.execute()
    return record


async def pull_progress(dispatcher: Dispatcher, record: dict[str, Any]) -> dict[str, Any]:
    """A pull job's record brought up to date from its stores' pull records: status, bytes."""
    states = await pull_states(dispatcher.redis, record["stores"], record["model"])
    known = [s for s in states.values() if s is not None]
    failed = [s for s in known if s.status == "failed"]
    if failed:
        status, error = "failed", failed[0].error
    elif known and len(known) == len(states) and all(s.status == "success" for s in known):
        status, error = "done", None
    else:
        status, error = ("running" if any(s.status != "queued" for s in known) else "queued"), None
    files = {f.digest: f for s in known for f in s.files}
    return {**record, "status": status, "error": error,
            "completed": sum(f.completed for f in files.values()), "total": sum(f.total for f in files.values()),
            "updated_at": max([record["updated_at"], *(s.updated_at for s in known)])}


@dataclass
class JobState:
    """A job's record and what its kept frames say so far."""

    record: dict[str, Any]
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    done: DoneFrame | None = None
    error: ErrorFrame | None = None
    frames: list[Frame] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.record["status"] in FINISHED or self.done is not None or self.error is not None


async def read(dispatcher: Dispatcher, job_id: str) -> JobState:
    async with dispatcher.redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.job_record(job_id))
        pipe.lrange(keys.job_frames(job_id), 0, -1)
        raw, kept = await pipe.execute()
    if raw is None:
        raise job_not_found(job_id, dispatcher.settings.keep_result_s)
    state = JobState(json.loads(raw))
    if state.record["kind"] == "pull":
        state.record = await pull_progress(dispatcher, state.record)
        return state
    for item in kept:
        _apply(state, _frame.validate_json(item))
    if state.record["status"] == "running" and not state.finished \
            and not await registry.worker_alive(dispatcher.redis, state.record.get("worker_id") or ""):
        state.record = await _worker_lost(dispatcher, state.record)
    elif state.record["status"] == "queued" and await dispatcher.redis.exists(result_key_prefix + job_id):
        # arq ended it without running it: an abort that arrived just as a worker took it.
        state.record = {**state.record, "status": "cancelled", "error": "cancelled before it started"}
    return state


async def _worker_lost(dispatcher: Dispatcher, record: dict[str, Any]) -> dict[str, Any]:
    """The worker running the job stopped (its heartbeat lapsed): the job failed, and arq
    must not keep it "in progress" for hours."""
    record = {**record, "status": "failed", "updated_at": time.time(),
              "error": f"the worker running this job ({record.get('worker_id')}) stopped responding; submit it again"}
    await dispatcher.redis.set(keys.job_record(record["job_id"]), json.dumps(record),
                               ex=dispatcher.settings.keep_result_s)
    await forget_job(dispatcher.redis, keys.queue_for(record["model"], record.get("priority", "interactive")),
                     record["job_id"])
    return record


def _apply(state: JobState, frame: Frame) -> None:
    state.frames.append(frame)
    if isinstance(frame, TokenFrame):
        state.text += frame.text
        if frame.logprobs is not None:
            state.logprobs = (state.logprobs or []) + frame.logprobs
    elif isinstance(frame, ToolCallsFrame):
        state.tool_calls.extend(frame.calls)
    elif isinstance(frame, DoneFrame):
        state.done = frame
    elif isinstance(frame, ErrorFrame):
        state.error = frame


def job_not_found(job_id: str, keep_result_s: int) -> NotFound:
    return NotFound(f"job '{job_id}' not found (finished jobs are kept for {keep_result_s} s, VLLAMA_KEEP_RESULT_S)")


async def recent(dispatcher: Dispatcher, limit: int) -> list[dict[str, Any]]:
    """The latest async jobs' records, newest first."""
    redis = dispatcher.redis
    ids = await redis.zrevrange(keys.JOBS, 0, limit - 1)
    if not ids:
        return []
    raws = await redis.mget([keys.job_record(i.decode() if isinstance(i, bytes) else i) for i in ids])
    return [json.loads(raw) for raw in raws if raw is not None]


async def cancel(dispatcher: Dispatcher, job_id: str) -> None:
    """A queued job is taken out of its queue; a running one is aborted in its worker (which
    records it as cancelled); a finished one is a 409."""
    state = await read(dispatcher, job_id)
    if state.finished:
        raise Conflict(f"job '{job_id}' is already {state.record['status']}; nothing to cancel")
    if state.record["kind"] == "pull":
        raise Conflict("a pull cannot be cancelled (other clients may be waiting for it); delete the model "
                       "once it is done if it is not wanted")
    redis = dispatcher.redis
    queue = keys.queue_for(state.record["model"], state.record.get("priority", "interactive"))
    if await withdraw(redis, queue, job_id):
        record = {**state.record, "status": "cancelled", "error": "cancelled before it started",
                  "updated_at": time.time()}
        await redis.set(keys.job_record(job_id), json.dumps(record), ex=dispatcher.settings.keep_result_s)
    else:
        await redis.zadd(abort_jobs_ss, {job_id: int(time.time() * 1000)})


async def follow(dispatcher: Dispatcher, job_id: str) -> AsyncIterator[Frame]:
    """Every frame of a job, the kept ones and then the live ones, until it ends; a job that
    failed or was cancelled ends with its error raised."""
    channel = keys.frames_channel(job_id)
    queue = await dispatcher.mux.subscribe(channel)  # before reading the kept frames
    try:
        state = await read(dispatcher, job_id)
        for frame in state.frames:
            if not isinstance(frame, StartFrame | ErrorFrame):
                yield frame
        seen = len(state.frames)
        while not state.finished:
            try:
                raw = await asyncio.wait_for(queue.get(), dispatcher.settings.heartbeat_interval_s)
            except TimeoutError:
                # Quiet: the job may have ended without a frame (cancelled, its worker lost).
                state.record = (await read(dispatcher, job_id)).record
                continue
            frame = _frame.validate_json(raw)
            if frame.seq < seen:
                continue  # already read from the kept frames
            seen = frame.seq + 1
            _apply(state, frame)
            if not isinstance(frame, StartFrame | ErrorFrame):
                yield frame
        if state.error is not None:
            raise from_code(state.error.code, state.error.message)
        if state.done is None:
            raise Conflict(f"job '{job_id}' was {state.record['status']}: "
                           f"{state.record.get('error') or 'it did not finish'}")
    finally:
        await dispatcher.mux.unsubscribe(channel)
