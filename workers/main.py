"""A generation worker process: one engine, one arq worker on the model's queue.

Start-up: advertise the model as "loading" (so requests queue instead of getting 404 while
the engine loads), load the engine off the event loop (so signals are still handled), then take
up to ``max_jobs`` jobs at once. Shutdown (SIGINT/SIGTERM): stop taking jobs, let running
ones finish within a grace period, cancel the rest, then close the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid

from arq.connections import ArqRedis
from arq.worker import func

from common import keys, registry
from common.errors import VllamaError
from common.models import canonical_name
from common.redis_conn import connect, job_deserializer, job_serializer
from common.settings import Settings
from common.tasks import cancel_and_wait
from workers.arq_worker import GenerationArqWorker
from workers.engine import Engine
from workers.frames import FrameSink
from workers.generation import GenerationRunner
from workers.heartbeat import Heartbeat

log = logging.getLogger(__name__)

DRAIN_GRACE_S = 30.0


def build_engine(settings: Settings) -> Engine:
    """Blocking: resolve the model files and start the engine (call from a thread)."""
    if settings.engine == "fake":
        from workers.fake_engine import FakeEngine

        # Answers with as many tokens as it may (num_predict or the context), 100 a second.
        return FakeEngine(max_model_len=settings.max_model_len or 2048, answer_tokens=10**9, step_s=0.01)
    from workers.engine import VllmEngine
    from workers.model_store import resolve_model_path

    path = resolve_model_path(settings.model, settings.model_cache)
    return VllmEngine.start(
        path,
        served_name=canonical_name(settings.model),
        max_num_seqs=settings.max_num_seqs,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        enforce_eager=settings.enforce_eager,
        kv_cache_gib=settings.kv_cache_gib,
    )


class GenerationWorker:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.model = canonical_name(settings.model)
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.engine = engine
        self.info = registry.WorkerInfo(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            models=[self.model],
            state="loading",
            started_at=time.time(),
            heartbeat_at=time.time(),
        )
        self._stop = asyncio.Event()
        self._arq: GenerationArqWorker | None = None
        self._runner: GenerationRunner | None = None
        self._sink: FrameSink | None = None

    def stop(self) -> None:
        """Idempotent; safe from a signal handler."""
        self._stop.set()

    async def run(self, redis: ArqRedis | None = None) -> None:
        assert self.settings.redis_url, "VLLAMA_REDIS_URL is not set"
        redis = redis or await connect(self.settings.redis_url)
        heartbeat = Heartbeat(self.settings.redis_url, self.info, self._refresh_info,
                              self.settings.heartbeat_interval_s, self.settings.heartbeat_ttl_s)
        heartbeat.start()
        try:
            if self.engine is None:
                log.info("worker %s: loading %s", self.worker_id, self.model)
                self.engine = await asyncio.to_thread(build_engine, self.settings)
            if self._stop.is_set():
                return
            await self._serve(redis)
        finally:
            await heartbeat.stop()
            if self._sink is not None:
                await self._sink.stop()
            await registry.remove_worker(redis, self.worker_id)
            if self.engine is not None:
                self.engine.close()
            await redis.aclose()

    async def _serve(self, redis: ArqRedis) -> None:
        engine = self.engine
        max_jobs = self.settings.max_jobs or engine.max_num_seqs
        self._sink = FrameSink(redis)
        self._sink.start()
        self._runner = GenerationRunner(engine, redis, self._sink, self.worker_id, self.settings.keep_result_s)
        self.info.max_jobs = max_jobs
        self.info.max_model_len = engine.max_model_len
        self.info.state = "ready"
        self._arq = GenerationArqWorker(
            functions=[func(self._runner.run, name="generate", max_tries=1, timeout=self.settings.job_timeout_s)],
            queue_name=keys.generation_queue(self.model),
            redis_pool=redis,
            max_jobs=max_jobs,
            poll_delay=self.settings.poll_delay_s,
            allow_abort_jobs=True,
            keep_result=self.settings.keep_result_s,
            job_serializer=job_serializer,
            job_deserializer=job_deserializer,
            handle_signals=False,
            health_check_interval=10,
            # A generation cannot resume a broken stream, so a lost job is failed, not re-run.
            retry_jobs=False,
        )
        log.info("worker %s: serving %s with up to %d jobs at once", self.worker_id, self.model, max_jobs)
        consume = asyncio.create_task(self._arq.async_run())
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({consume, stop}, return_when=asyncio.FIRST_COMPLETED)
        if consume.done():
            consume.result()  # a crashed consumer is an error, not a quiet exit
            return
        await self._drain(consume)

    async def _drain(self, consume: asyncio.Task) -> None:
        """Stop taking jobs, let running ones finish, then cancel what is left."""
        self.info.state = "draining"
        log.info("worker %s: draining %d running jobs", self.worker_id, len(self._runner.running))
        # The poll loop keeps running so aborts of running jobs are still honoured.
        self._arq.allow_pick_jobs = False
        deadline = time.monotonic() + DRAIN_GRACE_S
        while self._runner.running and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        tasks = list(self._arq.tasks.values())
        for task in tasks:
            task.cancel()
        # arq writes each cancelled job's result before its task ends.
        await asyncio.gather(*tasks, return_exceptions=True)
        await cancel_and_wait(consume)

    def _refresh_info(self) -> None:
        if self._runner is not None:
            self.info.running = len(self._runner.running)
            self.info.engine_requests = self.engine.in_flight()


def run_worker(settings: Settings) -> None:
    """Entry point of `vllama worker`."""

    async def main() -> None:
        worker = GenerationWorker(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    try:
        asyncio.run(main())
    except VllamaError as exc:  # e.g. a model that is not here: say so, no traceback
        log.error("worker cannot start: %s", exc.message)
        raise SystemExit(1) from None
