"""Pulling a model: one pull job per live store, followed to the end, shown as Ollama's lines.

Every store (machine) gets the model, so any worker can load it. A pull already under way on
a store (another client's) is followed rather than repeated: the job id is fixed per store and
model, and the state it reached is read from its record before following its frames. Pull
frames carry the whole state, so a missed frame costs nothing and no sequence check applies.
A client that goes away does not stop the pull: others may be following it, and a model half
downloaded would only be fetched again later.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from arq.connections import ArqRedis
from pydantic import TypeAdapter

from api.pubsub import FrameMultiplexer, Overflowed, Subscription
from common import catalog, keys
from common.job_queue import JobQueue
from common.errors import Unavailable, VllamaError, from_code
from common.protocol import Frame, PullFrame, PullState
from common.settings import Settings

_frame = TypeAdapter(Frame)
_PHASES = ["queued", "manifest", "downloading", "verifying", "converting", "writing", "success"]
QUIET_CHECK_S = 1.0
ORPHAN_RECHECK_S = 1.0  # far longer than a pull worker takes from taking a pull to saying it runs it

NO_STORE = ("no pull worker is running, so models cannot be pulled; start `vllama pull-worker` on each "
            "machine that runs workers (`vllama serve` starts one)")


async def follow_pull(redis: ArqRedis, mux: FrameMultiplexer, settings: Settings,
                      model: str) -> AsyncIterator[dict[str, PullState]]:
    """Start (or join) the pull of ``model`` on every live store; yield the states of all
    stores after each change, until every store has finished."""
    stores = await live_store_ids(redis, settings)
    channels = {s: keys.frames_channel(keys.pull_job_id(s, model)) for s in stores}
    subscriptions = {s: await mux.subscribe(channels[s]) for s in stores}  # before enqueue
    try:
        states = {s: await _start(redis, settings, s, model) for s in stores}
        yield dict(states)
        while not all(state.finished for state in states.values()):
            if await _next_frames(subscriptions, states, QUIET_CHECK_S):
                yield dict(states)
            elif await _recheck(redis, settings, states):
                yield dict(states)
    finally:
        for subscription in subscriptions.values():
            await mux.unsubscribe(subscription)


async def live_store_ids(redis: ArqRedis, settings: Settings) -> list[str]:
    stores = sorted(s.store_id for s in await catalog.live_stores(redis))
    if not stores:
        raise Unavailable(NO_STORE)
    return stores


async def start_pulls(redis: ArqRedis, settings: Settings, model: str) -> list[str]:
    """Start (or join) the pull of ``model`` on every live store, without following it."""
    stores = await live_store_ids(redis, settings)
    for store_id in stores:
        await _start(redis, settings, store_id, model)
    return stores


async def pull_states(redis: ArqRedis, stores: list[str], model: str) -> dict[str, PullState | None]:
    """The latest state of ``model``'s pull on each store (None once its record expired)."""
    raws = await redis.mget([keys.pull_record(s, model) for s in stores])
    return {s: None if raw is None else PullState.model_validate_json(raw) for s, raw in zip(stores, raws)}


async def _start(redis: ArqRedis, settings: Settings, store_id: str, model: str) -> PullState:
    record = keys.pull_record(store_id, model)
    queued = PullState(model=model, store_id=store_id)
    job_id = keys.pull_job_id(store_id, model)
    queue = JobQueue(redis, settings.keep_result_s)
    if await _orphaned(queue, store_id, model):  # the pull starts again instead
        await queue.forget(keys.store_queue(store_id), job_id)
    # The record first: a client joining between the enqueue and the job's first report must
    # not mistake the previous pull's final state for this one's.
    previous = await redis.set(record, queued.model_dump_json(), ex=settings.keep_result_s, get=True)
    if await queue.enqueue_store_job(store_id, "pull", model, job_id=job_id) or previous is None:
        return queued
    # A pull of this model is already under way there: put its state back and follow it.
    state = PullState.model_validate_json(previous)
    await redis.set(record, previous, ex=settings.keep_result_s)
    return state


async def _orphaned(queue: JobQueue, store_id: str, model: str) -> bool:
    """arq still counts the pull as running, but no pull worker says it runs it: its worker
    was killed. arq would keep it "in progress" for a day. A worker marks a job in progress
    as it takes it and says it runs it a moment later, so one sighting may be that moment:
    it must still look orphaned a little later."""
    job_id, alive = keys.pull_job_id(store_id, model), keys.pull_alive(store_id, model)
    if not await queue.store_job_orphaned(job_id, alive):
        return False
    await asyncio.sleep(ORPHAN_RECHECK_S)
    return await queue.store_job_orphaned(job_id, alive)


async def _next_frames(subscriptions: dict[str, Subscription], states: dict[str, PullState],
                       timeout: float) -> bool:
    """Apply every frame that arrives within ``timeout``; True if any did. A pull frame
    carries the whole state, so a reader that fell behind just waits for the next one (or
    the re-check of the records when none comes)."""
    waiting = {asyncio.ensure_future(sub.get(timeout)): s for s, sub in subscriptions.items()
               if not states[s].finished}
    done, pending = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    applied = False
    for task in done:
        if task.exception() is None and (raw := task.result()) is not None:
            _apply(states, raw)
            applied = True
    for sub in subscriptions.values():  # whatever else is already there
        try:
            waiting_frames = sub.take_all()
        except Overflowed:
            continue
        for raw in waiting_frames:
            _apply(states, raw)
            applied = True
    return applied


def _apply(states: dict[str, PullState], raw: bytes) -> None:
    frame = _frame.validate_json(raw)
    if isinstance(frame, PullFrame) and frame.state.store_id in states:
        states[frame.state.store_id] = frame.state


async def _recheck(redis: ArqRedis, settings: Settings, states: dict[str, PullState]) -> bool:
    """After a quiet spell: read the records (a frame may have been missed) and fail the
    pulls whose store has stopped. A finished record is final."""
    alive = {s.store_id for s in await catalog.live_stores(redis)}
    changed = False
    for store_id, state in states.items():
        if state.finished:
            continue
        raw = await redis.get(keys.pull_record(store_id, state.model))
        latest = PullState.model_validate_json(raw) if raw else state
        if not latest.finished and (store_id not in alive or await _orphaned(
                JobQueue(redis, settings.keep_result_s), store_id, state.model)):
            latest.status, latest.code = "failed", "unavailable"
            latest.error = (f"the pull worker of store {store_id} stopped during the pull; pull again: "
                            "files already fetched are kept")
        if latest != state:
            states[store_id] = latest
            changed = True
    return changed


class PullLines:
    """Turns the stores' states into Ollama's progress lines, each said once: "pulling
    manifest", one "pulling <digest>" line per file whenever its bytes move (the least
    complete store's count when several pull at once), "verifying sha256 digest", "writing
    manifest", "success"; or, once a store's pull failed, ``error``."""

    def __init__(self) -> None:
        self._said: set[str] = set()
        self._completed: dict[str, int] = {}
        self.error: VllamaError | None = None

    def lines(self, states: dict[str, PullState]) -> list[dict[str, Any]]:
        out = self._once("pulling manifest")  # Ollama's first line, whatever follows
        failed = [s for s in states.values() if s.status == "failed"]
        if failed:
            self.error = from_code(failed[0].code or "internal", failed[0].error or "the pull failed")
            return out
        phase = min(_PHASES.index(s.status) for s in states.values())
        out += self._files(states)
        if phase >= _PHASES.index("verifying"):
            out += self._once("verifying sha256 digest")
        if any(s.status == "converting" for s in states.values()):
            out += self._once("converting model")
        if phase >= _PHASES.index("writing"):
            out += self._once("writing manifest")
        if phase == _PHASES.index("success"):
            out += self._once("success")
        return out

    def _once(self, status: str) -> list[dict[str, Any]]:
        if status in self._said:
            return []
        self._said.add(status)
        return [{"status": status}]

    def _files(self, states: dict[str, PullState]) -> list[dict[str, Any]]:
        merged: dict[str, tuple[int, int]] = {}
        for state in states.values():
            for f in state.files:
                total, completed = merged.get(f.digest, (f.total, f.completed))
                merged[f.digest] = (max(total, f.total), min(completed, f.completed))
        out = []
        for digest, (total, completed) in merged.items():
            if self._completed.get(digest) != completed:
                self._completed[digest] = completed
                out.append({"status": f"pulling {digest[7:19]}", "digest": digest,
                            "total": total, "completed": completed})
        return out


async def pull_to_end(redis: ArqRedis, mux: FrameMultiplexer, settings: Settings, model: str) -> None:
    """Pull and wait (``"stream": false``, and auto-pull before a load); raises on failure."""
    lines = PullLines()
    async for states in follow_pull(redis, mux, settings, model):
        lines.lines(states)
        if lines.error:
            raise lines.error
