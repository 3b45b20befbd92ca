"""A generation worker process: holds up to ``max_loaded_models`` models, each with its own
engine and job consumer, and loads and unloads them as requests and keep_alive ask. Embedding
models are counted apart (as many again): a chat model and the embedding model of the same
retrieval app stay loaded side by side rather than evicting each other on every switch.

Start-up: the worker's own model (``VLLAMA_MODEL``; none if empty) loads first and stays
loaded unless a request says otherwise; meanwhile the worker advertises it as "loading", so
requests queue instead of getting 404. Then, every ``TICK_S``, the worker
- unloads models that have been idle for longer than their keep_alive, and
- claims a model that requests are waiting for (``vllama:loads``), if it may load it and has
  room, or an idle model it can unload to make room; one load at a time, off the event loop.
Shutdown (SIGINT/SIGTERM): stop taking jobs, let running ones finish within a grace period,
cancel the rest, then close the engines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from common import catalog, clock, heap, keys, registry
from common.durations import FOREVER, parse_keep_alive
from common.errors import ErrorCode, VllamaError
from common.model_info import is_embedding_model
from common.models import canonical_name, source_for
from common.records import LoadRecord
from common.redact import without_paths
from common.redis_conn import connect
from common.settings import Settings
from common.tasks import cancel_and_wait, run_until_signalled
from workers.engine import Engine
from workers.frames import FrameSink
from workers.heartbeat import Heartbeat
from workers.loaded import LoadedModel
from workers.store import ModelStore
from workers.wakeup import WakeupListener

log = logging.getLogger(__name__)

TICK_S = 0.25
DRAIN_GRACE_S = 30.0
# A worker that would have to unload a model to take a load request leaves it this long to
# workers with free room.
EVICT_DEFER_S = 1.0
# An engine that dies this often within the window is not restarted again: the worker exits
# non-zero, saying why, for its supervisor (or its operator) to look at.
ENGINE_DEATHS_ALLOWED = 3
ENGINE_DEATH_WINDOW_S = 600.0
# Jobs on a dead engine fail within moments; the ones that do not are cancelled after this.
DEAD_ENGINE_GRACE_S = 5.0

EngineFactory = Callable[[str, Path | None], Engine]


def build_engine(settings: Settings, name: str, path: Path | None) -> Engine:
    """Blocking: start the engine for ``name`` from ``path`` (call from a thread)."""
    if settings.engine == "fake":
        from workers.fake_engine import FakeEngine

        # Answers with as many tokens as it may (num_predict or the context), as a GPU would: a
        # step every 10 ms gives each of up to max_num_seqs running requests one token. An
        # embedding model's files (or, with none, a name that says "embed") make it embed.
        return FakeEngine(max_model_len=settings.max_model_len or 2048, answer_tokens=10**9, step_s=0.01,
                          max_num_seqs=settings.max_num_seqs or max(settings.max_jobs, 256), stepwise=True,
                          embedding=is_embedding_model(path) if path is not None else "embed" in name)
    from workers.cpu_defaults import engine_dtype, engine_threads
    from workers.engine import VllmEngine, has_cuda

    cuda = has_cuda()
    choice = engine_dtype(settings.dtype, cuda=cuda)
    log.info("%s: %s", name, choice)
    threads = engine_threads(cuda=cuda)
    if threads is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = threads.bind  # the engine's processes inherit it
        log.info("%s: %s", name, threads)
    return VllmEngine.start(
        path,
        served_name=name,
        max_num_seqs=settings.max_num_seqs,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=gpu_share(settings, path),
        tensor_parallel_size=settings.tensor_parallel_size,
        enforce_eager=settings.enforce_eager,
        kv_cache_gib=settings.kv_cache_gib,
        dtype=choice.dtype,
    )


# What an embedding model takes of a GPU: its weights are small and it keeps no KV cache
# between requests; it loads beside the generation models, whose shares stay whole.
EMBEDDING_GPU_SHARE = 0.05


def gpu_share(settings: Settings, path: Path) -> float:
    """The fraction of the GPU an engine may take: generation models loaded side by side
    share VLLAMA_GPU_MEMORY_UTILIZATION; an embedding model takes a small share besides."""
    if is_embedding_model(path):
        return EMBEDDING_GPU_SHARE
    return settings.gpu_memory_utilization / settings.max_loaded_models


class GenerationWorker:
    def __init__(self, settings: Settings, engine: Engine | None = None,
                 engine_factory: EngineFactory | None = None) -> None:
        self.settings = settings
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.store = ModelStore(settings.model_cache)
        self.models: dict[str, LoadedModel] = {}
        self.default_keep_alive = parse_keep_alive(settings.keep_alive)
        self._first_engine = engine  # tests hand in the engine for the worker's own model
        self._factory = engine_factory or (lambda name, path: build_engine(settings, name, path))
        self.info = registry.WorkerInfo(
            worker_id=self.worker_id, host=socket.gethostname(), pid=os.getpid(), models=[],
            may_load=[p.strip() for p in settings.models.split(",") if p.strip()] or ["*"], max_loaded=settings.max_loaded_models, state="loading",
            started_at=clock.now(), heartbeat_at=clock.now(),
        )
        self._stop = asyncio.Event()
        self._loading: asyncio.Task | None = None
        self._heartbeat: Heartbeat | None = None
        self._redis: ArqRedis | None = None
        self._sink: FrameSink | None = None
        self._wakeups: WakeupListener | None = None  # tells the job consumers of jobs and aborts
        self._engine_deaths: list[float] = []
        self._fatal: str | None = None  # why the worker stopped by itself; it then exits non-zero
        # Models whose engine is being started again: still advertised, so requests for them
        # wait in the queue for the new engine rather than being told the model is not here.
        self._restarting: set[str] = set()
        self._loads_seen: dict[str, float] = {}  # load requests (model -> monotonic time first seen)

    def stop(self) -> None:
        """Idempotent; safe from a signal handler."""
        self._stop.set()

    async def run(self, redis: ArqRedis | None = None) -> None:
        assert self.settings.redis_url, "VLLAMA_REDIS_URL is not set"
        self._redis = redis or await connect(self.settings.redis_url)
        heartbeat = self._heartbeat = Heartbeat(self.settings.redis_url, self.info, self._refresh_info,
                                                self.settings.heartbeat_interval_s, self.settings.heartbeat_ttl_s)
        await clock.sync(self._redis)  # before anything is stamped for other machines to read
        heartbeat.start()
        self._sink = FrameSink(self._redis)
        self._sink.start()
        self._wakeups = WakeupListener(self._redis)
        self._wakeups.start()
        try:
            if self.settings.model:
                await self._load(canonical_name(self.settings.model), pinned=True, engine=self._first_engine)
            self.info.state = "ready"
            while not self._stop.is_set():
                try:
                    await self._tick()
                except (RedisError, OSError) as exc:  # Redis away for a while: keep serving
                    log.warning("worker %s: Redis unreachable (%s)", self.worker_id, exc)
                try:
                    await asyncio.wait_for(self._stop.wait(), TICK_S)
                except TimeoutError:
                    pass
            self.info.state = "draining"
            log.info("worker %s: draining", self.worker_id)
            await cancel_and_wait(self._loading)
            await asyncio.gather(*(m.drain(DRAIN_GRACE_S) for m in list(self.models.values())))
        finally:
            await heartbeat.stop()
            for model in list(self.models.values()):
                await model.close()
            await self._wakeups.stop()
            await self._sink.stop()
            await registry.remove_worker(self._redis, self.worker_id)
            await self._redis.aclose()
        if self._fatal is not None:
            raise VllamaError(self._fatal)

    # ------------------------------------------------------------ the periodic look around

    async def _tick(self) -> None:
        ready = [m for m in self.models.values() if m.state == "ready"]
        async with self._redis.pipeline(transaction=False) as pipe:
            for m in ready:
                pipe.get(keys.keep_alive(m.name))
                pipe.zcard(keys.generation_queue(m.name))
                pipe.zcard(keys.batch_queue(m.name))
            pipe.zrange(keys.LOADS, 0, -1, withscores=True)
            results = await pipe.execute()
        now = clock.now()
        for i, m in enumerate(ready):
            raw, interactive, batch = results[3 * i:3 * i + 3]
            m.observe(now, interactive + batch, None if raw is None else float(raw))
        for m in list(self.models.values()):
            if m.engine_dead() and not m.death_handled:
                m.death_handled = True
                self._engine_died(m)
        for m in ready:
            if m.state != "ready":
                continue
            if m.task is not None and m.task.done():
                log.error("the job consumer of %s stopped (%s); unloading it", m.name, m.task.exception())
                await self._unload(m)
            elif m.expired(now):
                log.info("%s idle past its keep_alive; unloading", m.name)
                await self._unload(m)
        if self._loading is None or self._loading.done():
            await self._claim(results[-1])

    async def _claim(self, requests: list[tuple[bytes | str, float]]) -> None:
        # When this worker first saw each request, by its own monotonic clock: the scores are
        # another machine's wall clock, which may be off by more than the deferral.
        now = time.monotonic()
        names = {raw.decode() if isinstance(raw, bytes) else raw for raw, _ in requests}
        self._loads_seen = {n: self._loads_seen.get(n, now) for n in names}
        for raw, score in requests:
            name = raw.decode() if isinstance(raw, bytes) else raw
            if name in self.models:  # already here (or on its way): the request is met
                await self._redis.zrem(keys.LOADS, name)
                continue
            if not self.info.allows(name):
                continue
            victim = None
            embedding = await self._embeds(name)
            if sum(m.embedding == embedding for m in self.models.values()) >= self.settings.max_loaded_models:
                victim = self._evictable(embedding)
                if victim is None or now - self._loads_seen[name] < EVICT_DEFER_S:
                    continue
            if not await self._redis.zrem(keys.LOADS, name):
                continue  # another worker took it
            if victim is not None:
                log.info("unloading idle %s to make room for %s", victim.name, name)
                if not await self._unload(victim):
                    await self._redis.zadd(keys.LOADS, {name: score}, nx=True)  # give it back
                    return
            self._loading = asyncio.create_task(self._load_requested(name, embedding))
            return

    def _engine_died(self, model: LoadedModel) -> None:
        """Its engine process died: stop taking jobs for it at once (its running jobs fail
        with an error their clients see), then unload it and, if it is the worker's own
        model, start its engine again; an engine that keeps dying ends the worker."""
        model.stop_taking_jobs()
        self._heartbeat.poke()
        now = time.monotonic()
        self._engine_deaths = [t for t in self._engine_deaths if now - t < ENGINE_DEATH_WINDOW_S] + [now]
        if len(self._engine_deaths) > ENGINE_DEATHS_ALLOWED:
            self._fatal = (f"the engine of {model.name} died {len(self._engine_deaths)} times within "
                           f"{ENGINE_DEATH_WINDOW_S:.0f} s; not restarting it again (see the messages above)")
            log.error("worker %s: %s", self.worker_id, self._fatal)
            self.stop()
            return
        pinned = model.default_keep_alive == FOREVER
        if pinned:
            self._restarting.add(model.name)
        log.error("worker %s: the engine of %s died; its jobs fail, and it is %s", self.worker_id, model.name,
                  "being started again" if pinned else "unloaded")
        self._loading = asyncio.create_task(self._restart(model, pinned, after=self._loading))

    async def _restart(self, model: LoadedModel, pinned: bool, after: asyncio.Task | None) -> None:
        if pinned:
            self.info.state = "loading"
        try:
            await model.drain(DEAD_ENGINE_GRACE_S)
            if after is not None:  # a load already under way finishes first
                await asyncio.gather(after, return_exceptions=True)
            self.models.pop(model.name, None)
            self._heartbeat.poke()
            if not pinned:
                return  # a request for it asks for a load again
            await self._load(model.name, pinned=True)
            self.info.state = "ready"
            self._heartbeat.poke()
        except Exception as exc:  # noqa: BLE001 - the reason is recorded; the worker cannot serve
            self._fatal = f"the engine of {model.name} died and could not be started again: {without_paths(str(exc))}"
            self.stop()
        finally:
            self._restarting.discard(model.name)

    async def _embeds(self, name: str) -> bool:
        """Whether ``name`` is an embedding model, as its description (a store has it) or the
        alias table (a bundled model not yet made) says."""
        entry = await catalog.lookup(self._redis, name)
        if entry is not None:
            return "embedding" in entry.manifest.description.capabilities
        source = source_for(name)
        return source is not None and source.embedding

    def _evictable(self, embedding: bool) -> LoadedModel | None:
        """The idle model of the kind (embedding or generation) closest to expiring (models
        kept forever last)."""
        idle = [m for m in self.models.values() if m.idle() and m.embedding == embedding]
        return min(idle, key=lambda m: m.expires_at if m.expires_at is not None else float("inf"), default=None)

    # ------------------------------------------------------------ load and unload

    async def _load_requested(self, name: str, embedding: bool) -> None:
        try:
            await self._load(name, pinned=False, embedding=embedding)
        except Exception:  # noqa: BLE001 - recorded for the waiting requests; the worker goes on
            pass

    async def _load(self, name: str, *, pinned: bool, engine: Engine | None = None, embedding: bool = False) -> None:
        model = LoadedModel(name, default_keep_alive=FOREVER if pinned else self.default_keep_alive,
                            embedding=embedding)
        self.models[name] = model
        await self._record_load(name, "loading")
        started = time.monotonic()
        path: Path | None = None
        try:
            if engine is None:
                path = await self._resolve(model)
                engine = await asyncio.to_thread(self._factory, name, path)
            model.start(engine, self._redis, self._sink, self.worker_id, self.settings, wakeups=self._wakeups)
        except Exception as exc:
            self.models.pop(name, None)
            # The client hears the model's name, never where this machine keeps it.
            reason = without_paths(str(exc), {path: name} if path else None)
            code, message = (exc.code, exc.message) if isinstance(exc, VllamaError) \
                else (ErrorCode.INTERNAL, f"loading {name} failed: {reason}")
            log.error("worker %s: %s", self.worker_id, message, exc_info=not isinstance(exc, VllamaError))
            await self._record_load(name, "failed", code=code, error=message)
            raise
        heap.settle()  # the engine's objects (a model's are millions) are never garbage
        await self._record_load(name, "ready", load_s=round(time.monotonic() - started, 3))

    async def _resolve(self, model: LoadedModel) -> Path | None:
        """The model's directory on this machine, fetched first if another store has it."""
        from workers.pull import ensure_local

        entry = await catalog.lookup(self._redis, model.name)
        if self.settings.engine == "fake" and entry is None:
            return None  # it serves any name; a model some store has is still fetched, as for vLLM
        log.info("worker %s: loading %s", self.worker_id, model.name)
        path = await asyncio.to_thread(ensure_local, self.store, model.name, entry)
        manifest = self.store.get(model.name)
        model.size = manifest.size if manifest is not None else 0
        return path

    async def _unload(self, model: LoadedModel) -> bool:
        stopped = await model.try_stop()
        if stopped:
            self.models.pop(model.name, None)
        self._heartbeat.poke()
        return stopped

    async def _record_load(self, name: str, status: str, **fields: object) -> None:
        self._heartbeat.poke()
        record = LoadRecord(model=name, status=status, worker_id=self.worker_id, **fields)
        await self._redis.set(keys.load_record(name), record.model_dump_json(), ex=self.settings.keep_result_s)

    def _refresh_info(self) -> None:
        """Called from the heartbeat thread."""
        models = list(self.models.values())
        self.info.loaded = [m.status() for m in models]
        self.info.models = sorted({m.name for m in models if m.state in ("loading", "ready")} | self._restarting)
        self.info.running = sum(m.running for m in models)
        self.info.engine_requests = sum(m.engine.in_flight() for m in models if m.engine is not None)
        self.info.max_jobs = sum(m.max_jobs for m in models)
        self.info.max_model_len = max((m.engine.max_model_len for m in models if m.engine is not None), default=0)


def run_worker(settings: Settings) -> None:
    """Entry point of `vllama worker`."""
    # arq logs two lines per job; at hundreds of jobs a second that is a share of the worker's
    # CPU, and job records in Redis (and the jobs API) say what each job did.
    logging.getLogger("arq.worker").setLevel(logging.INFO if settings.job_log else logging.WARNING)

    try:
        run_until_signalled(lambda: GenerationWorker(settings))
    except VllamaError as exc:  # e.g. a model that is not here: say so, no traceback
        log.error("worker cannot start: %s", exc.message)
        raise SystemExit(1) from None
