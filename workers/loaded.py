"""One model loaded in a worker: its engine, its job consumer, and when it may be unloaded.

Each loaded model takes jobs from its own queues with its own arq consumers, so vLLM batches
that model's requests: the interactive queue (``vllama:queue:<model>``) up to ``max_jobs`` at
once, and the batch queue (``vllama:batch-queue:<model>``) up to a share of them
(VLLAMA_BATCH_SHARE). The rest of the engine's slots stay free for interactive requests, and
vLLM schedules batch requests at a lower priority, so a chat that arrives during a long batch
starts at once instead of after it. The consumers take a job as soon as it is queued, woken
by the worker's wake-up listener (workers/wakeup.py), and otherwise poll only every
VLLAMA_POLL_DELAY_S, so an idle model costs next to nothing. Idle time is
measured from the last job ending while no job waits in its queue; ``keep_alive`` (the latest
request's, from Redis, or the worker's default) says how long an idle model stays.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis

from common import clock, keys
from common.durations import FOREVER
from common.job_consumer import JobConsumer, job_function
from common.metrics import ModelStats
from common.redis_conn import job_deserializer, job_serializer
from common.registry import ModelStatus
from common.settings import Settings
from common.tasks import cancel_and_wait
from workers.engine import Engine
from workers.frames import FrameSink
from workers.generation import GenerationRunner
from workers.wakeup import WakeupListener

log = logging.getLogger(__name__)


class LoadedModel:
    def __init__(self, name: str, *, default_keep_alive: float, size: int = 0, embedding: bool = False) -> None:
        self.name = name
        # An embedding model: counted apart from generation models (VLLAMA_MAX_LOADED_MODELS
        # each). Foreseen from the model's description until its engine says.
        self.embedding = embedding
        self.state = "loading"
        self.default_keep_alive = default_keep_alive  # FOREVER for the worker's own model
        self.size = size
        self.engine: Engine | None = None
        self.runner: GenerationRunner | None = None
        self.consumers: list[JobConsumer] = []  # interactive queue, batch queue
        self.task: asyncio.Task | None = None  # runs the consumers
        self.max_jobs = 0
        self.load_started_at = self.loaded_at = clock.now()
        self.idle_since: float | None = clock.now()
        self.expires_at: float | None = None
        self.death_handled = False  # its engine died and the worker has begun to replace it
        self._wakeups: WakeupListener | None = None

    def start(self, engine: Engine, redis: Redis, sink: FrameSink, worker_id: str, settings: Settings, *,
              wakeups: WakeupListener) -> None:
        self.engine = engine
        self.embedding = engine.embedding
        self.max_jobs = settings.max_jobs or engine.max_num_seqs
        batch_jobs = max(1, int(self.max_jobs * settings.batch_share))
        self.runner = GenerationRunner(engine, redis, sink, worker_id, settings.keep_result_s,
                                       load_window=(self.load_started_at, clock.now()),
                                       on_engine_dead=self.stop_taking_jobs)
        self.consumers = [
            self._consumer(keys.generation_queue(self.name), self.max_jobs, redis, sink, settings),
            self._consumer(keys.batch_queue(self.name), batch_jobs, redis, sink, settings),
        ]
        self._wakeups = wakeups
        for consumer in self.consumers:
            wakeups.add(consumer)
        self.task = asyncio.create_task(self._consume(), name=f"jobs-{self.name}")
        self.state = "ready"
        self.loaded_at = self.idle_since = clock.now()
        self.observe(self.loaded_at, 0, None)  # until the next look at Redis
        log.info("serving %s with up to %d jobs at once (%d from the batch queue)", self.name, self.max_jobs,
                 batch_jobs)

    def _consumer(self, queue: str, max_jobs: int, redis: Redis, sink: FrameSink, settings: Settings) -> JobConsumer:
        return JobConsumer(
            functions=[job_function(self.runner.run, name="generate", max_tries=1, timeout=settings.job_timeout_s)],
            queue_name=queue,
            redis_pool=redis,
            max_jobs=max_jobs,
            poll_delay=settings.poll_delay_s,  # only the fallback: it is woken for each job and abort
            wake_ups=True,
            end_writer=sink.write,  # a job's end travels with the frames: one round trip for many jobs
            claimed_by=self.runner.worker_id,  # in keys.RUNNING from its claim to its end
            busy_field=self.name,  # counted in keys.busy(worker) meanwhile, for the API's routing
            allow_abort_jobs=True,
            keep_result=settings.keep_result_s,
            job_serializer=job_serializer,
            job_deserializer=job_deserializer,
            handle_signals=False,
            health_check_interval=10,
            # A generation cannot resume a broken stream, so a lost job is failed, not re-run.
            retry_jobs=False,
        )

    async def _consume(self) -> None:
        """Both consumers; if one stops (an error), the other is stopped too."""
        tasks = [asyncio.create_task(c.async_run()) for c in self.consumers]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                await cancel_and_wait(task)

    def engine_dead(self) -> bool:
        return self.state in ("ready", "failed") and self.engine is not None and self.engine.dead()

    def stop_taking_jobs(self) -> None:
        """Its engine died: take no more jobs (the API routes none here once the heartbeat
        shows it failed); the running ones fail by themselves."""
        self.state = "failed"
        self._pick_jobs(False)

    def _job_tasks(self) -> list[asyncio.Task]:
        return [t for c in self.consumers for t in c.tasks.values()]

    def _pick_jobs(self, allowed: bool) -> None:
        for consumer in self.consumers:
            consumer.allow_pick_jobs = allowed

    @property
    def running(self) -> int:
        return len(self.runner.running) if self.runner is not None else 0

    def observe(self, now: float, queued: int, keep_alive: float | None) -> None:
        """Track idleness; ``queued``: jobs in the model's queue (running ones included),
        ``keep_alive``: the latest request's, or None for this worker's default."""
        keep = self.default_keep_alive if keep_alive is None else keep_alive
        if self.running or queued:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = now
        if keep == FOREVER:
            self.expires_at = None
        else:
            self.expires_at = (self.idle_since or now) + keep

    def expired(self, now: float) -> bool:
        return self.state == "ready" and self.idle_since is not None and self.expires_at is not None \
            and now >= self.expires_at

    def idle(self) -> bool:
        return self.state == "ready" and self.idle_since is not None

    async def try_stop(self) -> bool:
        """Stop taking jobs; give up (and go on serving) if a job started meanwhile."""
        self.state = "unloading"
        self._pick_jobs(False)
        # A poll already under way may still start a job: let it finish its round.
        for consumer in self.consumers:
            await consumer.between_polls()
        if self.running or any(not t.done() for t in self._job_tasks()):
            self._pick_jobs(True)
            for consumer in self.consumers:
                consumer.wake()  # jobs queued meanwhile were not taken
            self.state = "ready"
            return False
        await self.close()
        return True

    async def drain(self, grace_s: float) -> None:
        """Shutdown: stop taking jobs, let running ones finish, then cancel the rest."""
        self.state = "unloading"
        if self.consumers:
            # The poll loops keep running so aborts of running jobs are still honoured.
            self._pick_jobs(False)
            deadline = time.monotonic() + grace_s
            while self.running and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            tasks = self._job_tasks()
            for task in tasks:
                task.cancel()
            # arq writes each cancelled job's result before its task ends.
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.close()

    async def close(self) -> None:
        if self._wakeups is not None:
            for consumer in self.consumers:
                self._wakeups.remove(consumer)
        await cancel_and_wait(self.task)
        self.task = None
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.close()
        log.info("unloaded %s", self.name)

    def status(self) -> ModelStatus:
        return ModelStatus(
            name=self.name, state=self.state, running=self.running, max_jobs=self.max_jobs,
            context_length=self.engine.max_model_len if self.engine is not None else 0,
            # The weights are on the GPU (vLLM's KV cache comes on top of them).
            size=self.size, size_vram=self.size if getattr(self.engine, "on_gpu", False) else 0,
            loaded_at=self.loaded_at, expires_at=self.expires_at, stats=self._stats(),
        )

    def _stats(self) -> ModelStats | None:
        if self.runner is None or self.engine is None:
            return None
        running, waiting, kv_cache_usage = self.engine.scheduler_stats()
        queries, hits = self.engine.prefix_cache_stats()
        return self.runner.stats.model_copy(update={"engine_running": running, "engine_waiting": waiting,
                                                    "kv_cache_usage": kv_cache_usage, "prefix_cache_queries": queries,
                                                    "prefix_cache_hits": hits})
