"""From a job spec to a stream of frames: admission, subscribe-then-enqueue, watchdog, abort.

The API never runs a model. It checks that some live worker serves the model (or has one
load it: api/loading.py; 404 if it cannot be had), that the model's queue is not over its
limit (503), subscribes to the job's channel, enqueues the job for arq, and then yields the
worker's frames in order. While waiting it watches the
worker that took the job: if that worker's heartbeat stops, the client gets an error within
seconds instead of hanging.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss
from pydantic import TypeAdapter

from api.admission import DUPLICATE_ID, QUEUE_FULL, enqueue_if_room, forget_job
from api.loading import Loader
from api.pubsub import FrameMultiplexer
from common import job_records, keys, registry
from common.errors import ServerBusy, StreamBroken, Unavailable, VllamaError, WorkerLost, from_code
from common.protocol import DoneFrame, ErrorFrame, Frame, GenerationJob, StartFrame
from common.settings import Settings

_frame = TypeAdapter(Frame)
WORKER_CACHE_S = 0.5


class Dispatcher:
    def __init__(self, redis: ArqRedis, mux: FrameMultiplexer, settings: Settings) -> None:
        self.redis = redis
        self.mux = mux
        self.settings = settings
        self._workers: list[registry.WorkerInfo] = []
        self._workers_at = 0.0
        self.loader = Loader(redis, mux, settings)

    async def live_workers(self, fresh: bool = False) -> list[registry.WorkerInfo]:
        """Live workers, cached briefly: every request asks, Redis need not answer each."""
        now = time.monotonic()
        if fresh or now - self._workers_at > WORKER_CACHE_S:
            self._workers = await registry.live_workers(self.redis, self.settings.heartbeat_ttl_s)
            self._workers_at = now
        return self._workers

    async def workers_for(self, model: str, fresh: bool = False) -> list[registry.WorkerInfo]:
        return [w for w in await self.live_workers(fresh) if model in w.models]

    async def ensure_served(self, model: str) -> list[registry.WorkerInfo]:
        """Workers holding ``model``; when there are none, a load is requested (and the
        request's job will wait in the queue for it), or ModelNotFound raised."""
        workers = await self.workers_for(model) or await self.workers_for(model, fresh=True)
        if not workers:
            await self.loader.request(model)
        return workers

    async def ensure_servable(self, model: str) -> None:
        """For work that can wait (async jobs, batch lines): 404 if the model cannot be had;
        with no worker up (or none that may load it), the work waits in its queue for one."""
        try:
            await self.ensure_served(model)
        except Unavailable:
            await self.loader.ask_later(model)

    async def submit(self, job: GenerationJob, keep_alive: float | None = None) -> JobStream:
        workers = await self.ensure_served(job.model)
        # Up to the workers' combined concurrency the queue's jobs run at once; beyond that
        # they wait, and at most max_queue may wait (Ollama's OLLAMA_MAX_QUEUE).
        running = sum(s.max_jobs for w in workers if (s := w.status_of(job.model)) is not None)
        stream = JobStream(self, job)
        await stream.open(running + self.settings.max_queue, keep_alive)
        return stream

    async def record(self, job: GenerationJob, status: job_records.Status, **fields: object) -> None:
        await job_records.write(self.redis, job, status, self.settings.keep_result_s, **fields)


class JobStream:
    """One submitted job as seen by the request that submitted it."""

    def __init__(self, dispatcher: Dispatcher, job: GenerationJob) -> None:
        self._d = dispatcher
        self.job = job
        self._channel = keys.frames_channel(job.job_id)
        self._queue: asyncio.Queue[bytes] | None = None
        self.worker_id: str | None = None
        self.finished = False

    async def open(self, limit: int, keep_alive: float | None = None) -> None:
        d = self._d
        self._queue = await d.mux.subscribe(self._channel)  # before enqueue: pub/sub keeps nothing
        try:
            outcome = await enqueue_if_room(d.redis, self.job, "generate", limit, d.settings.keep_result_s,
                                            keep_alive)
            if outcome == QUEUE_FULL:
                raise ServerBusy()
            if outcome == DUPLICATE_ID:
                raise VllamaError(f"job id {self.job.job_id} already exists; retry the request")
        except BaseException:
            await d.mux.unsubscribe(self._channel)
            raise

    async def frames(self) -> AsyncIterator[StartFrame | DoneFrame | ErrorFrame | Frame]:
        """Frames in order, ending with a DoneFrame; a worker's error frame is raised."""
        expected = 0
        tick = self._d.settings.heartbeat_interval_s
        while True:
            try:
                # The common case under load: a frame is already there, no timer needed.
                raw = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    raw = await asyncio.wait_for(self._queue.get(), tick)
                except TimeoutError:
                    await self._check_progress()
                    continue
            frame = _frame.validate_json(raw)
            if frame.seq != expected:
                raise StreamBroken(
                    f"lost part of the answer (frame {expected} expected, {frame.seq} received); "
                    "retry the request"
                )
            expected += 1
            if isinstance(frame, StartFrame):
                self.worker_id = frame.worker_id
            elif isinstance(frame, ErrorFrame):
                self.finished = True
                raise from_code(frame.code, frame.message)
            elif isinstance(frame, DoneFrame):
                self.finished = True
                yield frame
                return
            yield frame

    async def _check_progress(self) -> None:
        """Called after a quiet tick: is whoever should be producing frames still alive?"""
        d = self._d
        if self.worker_id is not None:
            if not await registry.worker_alive(d.redis, self.worker_id):
                message = (
                    f"the worker running this request ({self.worker_id}) stopped responding; "
                    "the answer is incomplete, retry the request"
                )
                await d.record(self.job, "failed", worker_id=self.worker_id, error=message)
                await self._forget_in_arq()
                self.finished = True
                raise WorkerLost(message)
            return
        if not await d.workers_for(self.job.model, fresh=True):
            # Nobody holds the model (yet, or any more): keep a load requested, and give up
            # with the reason when loading it failed or takes too long.
            try:
                await d.loader.check_waiting(self.job.model, self.job.created_at)
            except VllamaError:
                await self.cancel()
                await self._forget_in_arq()
                raise

    async def _forget_in_arq(self) -> None:
        """A stream cannot be resumed, so a job whose worker died must not run later."""
        await forget_job(self._d.redis, keys.queue_for(self.job.model, self.job.priority), self.job.job_id)

    async def cancel(self) -> None:
        """Ask arq to abort the job: a queued job never starts, a running one is cancelled
        in its worker, which aborts the engine request."""
        await self._d.redis.zadd(abort_jobs_ss, {self.job.job_id: int(time.time() * 1000)})
        self.finished = True
        if self.worker_id is None:
            await self._d.record(self.job, "cancelled", error="cancelled before it started")

    async def close(self) -> None:
        """Always called: unsubscribes, and aborts the job if the client left before the end."""
        try:
            if not self.finished:
                await self.cancel()
        finally:
            await self._d.mux.unsubscribe(self._channel)
