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

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pydantic import TypeAdapter

from api.dispatch import Dispatcher
from api.pubsub import Overflowed
from api.pulls import pull_states, start_pulls
from common import clock, keys
from common.errors import Conflict, NotFound, from_code
from common.protocol import (
    DoneFrame,
    ErrorFrame,
    Frame,
    GenerationJob,
    StartFrame,
    ThinkingFrame,
    TokenFrame,
    TokenLogprob,
    ToolCallsFrame,
)
from common.records import JobRecord
from common.tool_calls import ToolCall

_frame = TypeAdapter(Frame)


async def submit(dispatcher: Dispatcher, job: GenerationJob, keep_alive: float | None) -> JobRecord:
    """Queue ``job`` to run without a listener; returns its record. A model no worker holds
    is asked for, and with no worker up at all the job simply waits for one."""
    job.stream = False
    await dispatcher.ensure_servable(job.model)
    await dispatcher.with_model_defaults(job)
    settings = dispatcher.settings
    limit = settings.max_batch_queue if job.priority == "batch" else settings.max_queue
    await dispatcher.route(job)
    try:
        await dispatcher.queue.enqueue(job, limit, keep_alive)
    finally:
        dispatcher.router.settle([job])
    now_ms = int(clock.now() * 1000)
    async with dispatcher.redis.pipeline(transaction=False) as pipe:
        pipe.zadd(keys.JOBS, {job.job_id: now_ms})
        pipe.zremrangebyscore(keys.JOBS, "-inf", now_ms - settings.keep_result_s * 1000)
        await pipe.execute()
    return JobRecord.of(job, "queued")


async def submit_pull(dispatcher: Dispatcher, model: str, owner: str | None = None) -> JobRecord:
    """Start (or join) the pull of ``model`` on every live store; the job's record names the
    stores, and its state is read from their pull records."""
    stores = await start_pulls(dispatcher.redis, dispatcher.settings, model)
    now = clock.now()
    record = JobRecord(job_id=f"pull-{uuid.uuid4().hex}", model=model, kind="pull", priority="batch",
                       is_async=True, status="queued", stores=stores, created_at=now, owner=owner)
    async with dispatcher.redis.pipeline(transaction=False) as pipe:
        pipe.set(keys.job_record(record.job_id), record.dump(), ex=dispatcher.settings.keep_result_s)
        pipe.zadd(keys.JOBS, {record.job_id: int(now * 1000)})
        await pipe.execute()
    return record


@dataclass
class PullProgress:
    """A pull job's bytes so far, over all its stores."""

    completed: int = 0
    total: int = 0


async def pull_progress(dispatcher: Dispatcher, record: JobRecord) -> tuple[JobRecord, PullProgress]:
    """A pull job's record brought up to date from its stores' pull records: status, bytes."""
    states = await pull_states(dispatcher.redis, record.stores, record.model)
    known = [s for s in states.values() if s is not None]
    failed = [s for s in known if s.status == "failed"]
    if failed:
        status, error = "failed", failed[0].error
    elif known and len(known) == len(states) and all(s.status == "success" for s in known):
        status, error = "done", None
    else:
        status, error = ("running" if any(s.status != "queued" for s in known) else "queued"), None
    files = {f.digest: f for s in known for f in s.files}
    updated = record.model_copy(update={"status": status, "error": error,
                                        "updated_at": max([record.updated_at, *(s.updated_at for s in known)])})
    return updated, PullProgress(sum(f.completed for f in files.values()), sum(f.total for f in files.values()))


@dataclass
class JobState:
    """A job's record and what its kept frames say so far."""

    record: JobRecord
    pull: PullProgress | None = None
    text: str = ""
    thinking: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    done: DoneFrame | None = None
    error: ErrorFrame | None = None
    frames: list[Frame] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.record.finished or self.done is not None or self.error is not None


async def read(dispatcher: Dispatcher, job_id: str) -> JobState:
    async with dispatcher.redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.job_record(job_id))
        pipe.lrange(keys.job_frames(job_id), 0, -1)
        raw, kept = await pipe.execute()
    if raw is None:
        raise job_not_found(job_id, dispatcher.settings.keep_result_s)
    state = JobState(JobRecord.model_validate_json(raw))
    if state.record.kind == "pull":
        state.record, state.pull = await pull_progress(dispatcher, state.record)
        return state
    for item in kept:
        _apply(state, _frame.validate_json(item))
    if not state.finished:
        state.record = await _settle(dispatcher, state.record)
    return state


async def _settle(dispatcher: Dispatcher, record: JobRecord) -> JobRecord:
    """A job that will never end by itself, recorded as ended: its worker died while running
    it (failed), or arq ended it without running it, as when an abort arrives just as a
    worker takes it (cancelled)."""
    queue = dispatcher.queue
    if record.status == "running":
        return await queue.settle_lost(record) or record
    if record.status == "queued" and (await queue.ended_unrun([record.job_id]))[0]:
        return record.ended("cancelled", "cancelled before it started")
    return record


def _apply(state: JobState, frame: Frame) -> None:
    if frame.seq < len(state.frames):
        return  # kept twice: its worker sent it again after a Redis blip (workers/frames.py)
    state.frames.append(frame)
    if isinstance(frame, TokenFrame):
        state.text += frame.text
        if frame.logprobs is not None:
            state.logprobs = (state.logprobs or []) + frame.logprobs
    elif isinstance(frame, ThinkingFrame):
        state.thinking += frame.text
    elif isinstance(frame, ToolCallsFrame):
        state.tool_calls.extend(frame.calls)
    elif isinstance(frame, DoneFrame):
        state.done = frame
    elif isinstance(frame, ErrorFrame):
        state.error = frame


def job_not_found(job_id: str, keep_result_s: int) -> NotFound:
    return NotFound(f"job '{job_id}' not found (finished jobs are kept for {keep_result_s} s, VLLAMA_KEEP_RESULT_S)")


async def recent(dispatcher: Dispatcher, limit: int,
                 visible: Callable[[JobRecord], bool] = lambda _: True) -> list[JobRecord]:
    """The latest async jobs' records that are ``visible`` (to the asking key), newest first;
    read a page at a time, so one key's list is full even when others submitted since."""
    redis = dispatcher.redis
    found: list[JobRecord] = []
    page = max(limit, 100)
    start = 0
    while len(found) < limit:
        ids = await redis.zrevrange(keys.JOBS, start, start + page - 1)
        if not ids:
            break
        raws = await redis.mget([keys.job_record(i.decode() if isinstance(i, bytes) else i) for i in ids])
        found += [r for r in (JobRecord.model_validate_json(raw) for raw in raws if raw is not None) if visible(r)]
        start += page
    return found[:limit]


async def cancel(dispatcher: Dispatcher, job_id: str) -> None:
    """A queued job is taken out of its queue; a running one is aborted in its worker (which
    records it as cancelled); a finished one is a 409."""
    state = await read(dispatcher, job_id)
    if state.finished:
        raise Conflict(f"job '{job_id}' is already {state.record.status}; nothing to cancel")
    if state.record.kind == "pull":
        raise Conflict("a pull cannot be cancelled (other clients may be waiting for it); delete the model "
                       "once it is done if it is not wanted")
    await dispatcher.queue.cancel(state.record)


async def follow(dispatcher: Dispatcher, job_id: str) -> AsyncIterator[Frame]:
    """Every frame of a job, the kept ones and then the live ones, until it ends; a job that
    failed or was cancelled ends with its error raised. Each follower has its own
    subscription, so any number may follow one job. A follower that fell behind (frames
    dropped for a slow reader, or lost while Redis was away) catches up from the kept frames,
    which the worker writes in the same round trip as it publishes them."""
    channel = keys.frames_channel(job_id)
    mux = dispatcher.mux
    subscription = await mux.subscribe(channel)  # before reading the kept frames
    try:
        state = JobState(JobRecord(job_id=job_id, model="", kind="generate", status="queued", created_at=0))
        seen = 0
        catch_up = True
        while True:
            if catch_up:
                fresh = await read(dispatcher, job_id)
                state.record = fresh.record
                for frame in fresh.frames[seen:]:
                    _apply(state, frame)
                    if not isinstance(frame, StartFrame | ErrorFrame):
                        yield frame
                seen = max(seen, len(fresh.frames))
                catch_up = False
            if state.finished:
                break
            try:
                raw = await subscription.get(dispatcher.settings.heartbeat_interval_s)
            except Overflowed:
                await mux.unsubscribe(subscription)
                subscription = await mux.subscribe(channel)
                raw = None
            if raw is None:  # quiet, or behind: the job may also have ended without a frame
                catch_up = True
                continue
            frame = _frame.validate_json(raw)
            if frame.seq != seen:
                catch_up = frame.seq > seen  # behind: read what is missing; else already read
                continue
            seen += 1
            _apply(state, frame)
            if not isinstance(frame, StartFrame | ErrorFrame):
                yield frame
        if state.error is not None:
            raise from_code(state.error.code, state.error.message)
        if state.done is None:
            raise Conflict(f"job '{job_id}' was {state.record.status}: {state.record.error or 'it did not finish'}")
    finally:
        await mux.unsubscribe(subscription)
