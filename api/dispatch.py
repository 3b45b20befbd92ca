"""From a job spec to a stream of frames: admission, inbox-then-enqueue, watchdog, abort.

The API never runs a model. It checks that some live worker serves the model (or has one
load it: api/loading.py; 404 if it cannot be had), that the model's queue is not over its
limit (503), opens the job's inbox on this process's reply channel (api/pubsub.py), enqueues
the job (common/job_queue.py), and then yields the worker's frames in order, in batches: all
that arrived since the last look, so a stream that is behind catches up in one write.
Nothing hangs: after every quiet heartbeat interval it checks on the job, and the client gets
an error within seconds when the worker running it died, when the job vanished from Redis (a
restart that lost the data), when the worker that took it died before starting it, or when no
worker started it within VLLAMA_QUEUE_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from arq.connections import ArqRedis
from pydantic import TypeAdapter

from api.brief_cache import BriefCache
from api.loading import Loader
from api.pubsub import FrameMultiplexer, Subscription
from api.routing import Router
from common import catalog, clock, keys, model_defaults, registry
from common.errors import StreamBroken, Unavailable, VllamaError, WorkerLost, from_code
from common.job_queue import JOB_LOST_MESSAGE, JobQueue, worker_lost_message
from common.model_info import ModelDescription
from common.protocol import DoneFrame, ErrorFrame, Frame, GenerationJob, StartFrame
from common.records import JobStatus
from common.settings import Settings

_frame = TypeAdapter(Frame)
log = logging.getLogger(__name__)
WORKER_CACHE_S = 0.5


class Dispatcher:
    def __init__(self, redis: ArqRedis, mux: FrameMultiplexer, settings: Settings) -> None:
        self.redis = redis
        self.mux = mux
        self.settings = settings
        self._workers: BriefCache[None, list[registry.WorkerInfo]] = BriefCache(
            WORKER_CACHE_S, lambda _: registry.live_workers(redis))
        self.queue = JobQueue(redis, settings.keep_result_s)
        self.router = Router(redis, settings.route_hold_s, settings.route_affinity)
        self.loader = Loader(redis, mux, settings)
        mux.on_orphan = self._orphaned
        self._aborting: set[asyncio.Task] = set()
        self._descriptions: BriefCache[str, ModelDescription | None] = BriefCache(WORKER_CACHE_S, self._description)

    async def with_model_defaults(self, job: GenerationJob) -> None:
        """Give ``job`` what its model was created with (common/model_defaults.py). The model's
        description comes from the catalog, cached as briefly as the workers are."""
        if job.kind == "embed":
            return
        description = await self._descriptions.get(job.model)
        if description is not None:
            model_defaults.apply(job, description)

    async def _description(self, model: str) -> ModelDescription | None:
        entry = await catalog.lookup(self.redis, model)
        return entry.manifest.description if entry is not None else None

    def _orphaned(self, job_id: str) -> None:
        """A worker streams a job nobody here reads: its client left and the abort sent then
        did not arrive (Redis was away). Abort it again, so the engine stops working for nobody."""
        task = asyncio.create_task(self.queue.abort(job_id), name=f"abort-{job_id}")
        self._aborting.add(task)
        task.add_done_callback(self._aborting.discard)

    async def live_workers(self, fresh: bool = False) -> list[registry.WorkerInfo]:
        """Live workers, cached briefly: every request asks, Redis need not answer each."""
        return await self._workers.get(None, fresh)

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
        job.model = await self.loader.resolve(job.model, await self.live_workers())  # QWEN/x is Qwen/x
        workers = await self.ensure_served(job.model)
        await self.with_model_defaults(job)
        # Up to the workers' combined concurrency the queue's jobs run at once; beyond that
        # they wait, and at most max_queue may wait (Ollama's OLLAMA_MAX_QUEUE).
        running = sum(s.max_jobs for w in workers if (s := w.status_of(job.model)) is not None)
        stream = JobStream(self, job)
        await self.route(job, workers)
        try:
            await stream.open(running + self.settings.max_queue, keep_alive)
        finally:
            self.router.settle([job])
        return stream

    async def route(self, job: GenerationJob, workers: list[registry.WorkerInfo] | None = None) -> None:
        """Pick the worker ``job`` goes to (api/routing.py), unless routing is off."""
        if self.settings.route:
            await self.router.route([job], await self.workers_for(job.model) if workers is None else workers)

    async def record(self, job: GenerationJob, status: JobStatus, **fields: object) -> None:
        await self.queue.mark(job, status, **fields)


class JobStream:
    """One submitted job as seen by the request that submitted it."""

    def __init__(self, dispatcher: Dispatcher, job: GenerationJob) -> None:
        self._d = dispatcher
        self.job = job
        self._sub: Subscription | None = None
        self.worker_id: str | None = None
        self.finished = False
        # Quiet checks in a row that found the job where it cannot make progress; a fault is
        # declared on the second, so a frame still on its way is never mistaken for one.
        self._strikes = 0
        self._taken_at: float | None = None  # when a worker was first seen to hold it unstarted

    async def open(self, limit: int, keep_alive: float | None = None) -> None:
        d = self._d
        self._sub = await d.mux.inbox(self.job.job_id)  # before enqueue: pub/sub keeps nothing
        self.job.reply_to = d.mux.reply_channel
        try:
            await d.queue.enqueue(self.job, limit, keep_alive)
        except BaseException:
            await d.mux.unsubscribe(self._sub)
            raise

    async def batches(self) -> AsyncIterator[list[Frame]]:
        """Frames in order, in batches of those that arrived together, the last ending with a
        DoneFrame; a worker's error frame is raised (after the frames before it)."""
        expected = 0
        tick = self._d.settings.heartbeat_interval_s
        while True:
            raws = self._sub.take_all()
            if not raws:
                if not await self._sub.wait(tick):
                    await self._check_progress()
                    continue
                raws = self._sub.take_all()
            self._strikes = 0
            batch: list[Frame] = []
            for raw in raws:
                frame = _frame.validate_python(raw)
                if frame.seq < expected:
                    continue  # sent again after a Redis blip (workers/frames.py)
                if frame.seq != expected:
                    error: VllamaError = StreamBroken(
                        f"lost part of the answer (frame {expected} expected, {frame.seq} received); "
                        "retry the request")
                    break
                expected += 1
                if isinstance(frame, ErrorFrame):
                    self.finished = True
                    error = from_code(frame.code, frame.message)
                    break
                if isinstance(frame, StartFrame):
                    self.worker_id = frame.worker_id
                batch.append(frame)
                if isinstance(frame, DoneFrame):
                    self.finished = True
                    yield batch
                    return
            else:
                if batch:
                    yield batch
                continue
            if batch:
                yield batch
            raise error

    async def _check_progress(self) -> None:
        """Called after a quiet tick: can the job still produce frames?"""
        d = self._d
        where = await d.queue.whereabouts(self.job.job_id)
        if self.worker_id is not None:
            if not await registry.worker_alive(d.redis, self.worker_id):
                await self._give_up(WorkerLost(worker_lost_message(self.worker_id)), "failed")
            if where != "running":  # ended (its last frames lost) or gone with Redis's data
                await self._strike(StreamBroken(
                    "the answer was cut off: its last part was lost (Redis restarted or failed over); "
                    "retry the request"))
            return
        if where == "gone":
            await self._strike(Unavailable(JOB_LOST_MESSAGE))
            return
        if where == "running":
            # A worker took it but has not said so: it says so at once, unless it died first.
            now = time.monotonic()
            self._taken_at = self._taken_at or now
            if now - self._taken_at > 2 * d.settings.heartbeat_ttl_s:
                await self._give_up(Unavailable(JOB_LOST_MESSAGE), "failed")
            return
        if clock.now() - self.job.created_at > d.settings.queue_timeout_s and \
                await d.queue.withdraw(keys.queue_for(self.job.model, self.job.priority), self.job.job_id):
            self.finished = True
            await d.record(self.job, "cancelled", error="no worker started it in time")
            raise Unavailable(f"no worker started this request within {d.settings.queue_timeout_s:.0f} s "
                              "(VLLAMA_QUEUE_TIMEOUT_S): the workers are busy or down; retry later")
        if not await d.workers_for(self.job.model, fresh=True):
            # Nobody holds the model (yet, or any more): keep a load requested, and give up
            # with the reason when loading it failed or takes too long.
            try:
                await d.loader.check_waiting(self.job.model, self.job.created_at)
            except VllamaError as exc:
                await self._give_up(exc, "cancelled")

    async def _strike(self, error: VllamaError) -> None:
        self._strikes += 1
        if self._strikes >= 2:
            await self._give_up(error, "failed")

    async def _give_up(self, error: VllamaError, status: JobStatus) -> None:
        """End the stream with ``error``: the job is recorded so and removed from arq, since a
        stream cannot be resumed and the job must not run (again) later."""
        d = self._d
        self.finished = True
        await d.record(self.job, status, worker_id=self.worker_id, error=error.message)
        await d.queue.abort(self.job.job_id)
        await d.queue.forget(keys.queue_for(self.job.model, self.job.priority), self.job.job_id)
        raise error

    async def cancel(self) -> None:
        """End the job: a queued one is taken out of its queue, so it never starts and leaves
        nothing behind; a running one is aborted (arq cancels it in its worker, which aborts
        the engine request)."""
        self.finished = True
        d = self._d
        if self.worker_id is None:
            await d.record(self.job, "cancelled", error="cancelled before it started")
            if await d.queue.withdraw(keys.queue_for(self.job.model, self.job.priority), self.job.job_id):
                return
        await d.queue.abort(self.job.job_id)

    async def close(self) -> None:
        """Always called: unsubscribes, and aborts the job if the client left before the end.
        Never raises: it runs as a response ends, when an error could only cut the stream short."""
        try:
            if not self.finished:
                await self.cancel()
        except Exception:  # noqa: BLE001 - e.g. Redis away; the job ends with its worker's check
            log.warning("could not cancel job %s", self.job.job_id, exc_info=True)
        finally:
            await self._d.mux.unsubscribe(self._sub)
