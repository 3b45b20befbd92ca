"""The pull worker: looks after one model store (a machine's model cache).

It takes the store's jobs (pull, delete, copy, create) from ``vllama:store-queue:<store>``, away from
the generation queues so that a long download never delays anything else, and mirrors the
store's manifests into Redis (common/catalog.py) so every API replica can list and describe
the models. Pull progress goes out as pull frames, each carrying the whole state, and the
latest state is also kept in ``vllama:pull:<store>:<model>`` for clients that join later.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from arq.connections import ArqRedis

from common import blob_catalog, catalog, clock, keys, model_info
from common.errors import ErrorCode, VllamaError
from common.job_consumer import JobConsumer, job_function
from common.models import canonical_name
from common.protocol import PullFrame, PullState
from common.redis_conn import connect, job_deserializer, job_serializer
from common.settings import Settings
from common.tasks import cancel_and_wait, run_until_signalled, until_redis_answers
from common.redact import without_paths
from workers.frames import FramePublisher, FrameSink
from workers.wakeup import WakeupListener
from workers.peer_server import StoreServer, StoreServerError
from workers.disk_space import DiskReservations, ReservedSpace
from workers.blob_models import create_from_blobs
from workers.blobs import SWEEP_EVERY_S, BlobReceiver, list_blobs, sweep
from workers.pull import Progress, pull
from workers.push import PushJob, push_model
from workers.store import ModelStore

log = logging.getLogger(__name__)

PUBLISH_EVERY_S = 0.1  # Ollama reports about every 60 ms
PULL_TIMEOUT_S = 24 * 3600
# A model made from uploaded files: fetching blobs from another store, and converting a large
# GGUF file, take a while (about 25 s for 135M parameters on 2 cores; a 70B file, hours).
CREATE_FROM_FILES_TIMEOUT_S = 6 * 3600


def store_id_for(settings: Settings) -> str:
    return settings.store_id or socket.gethostname()


class PullWorker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = ModelStore(settings.model_cache)
        self.store_id = store_id_for(settings)
        self._stop = asyncio.Event()
        self._redis: ArqRedis | None = None
        self._sink: FrameSink | None = None
        # Serves this store's files to other machines; its URL and token go out with every
        # heartbeat (common/catalog.py StoreInfo).
        self.server = StoreServer(self.store)
        # Serialises writes to the store's Redis catalog: a resync from disk taken before a
        # pull saved its manifest must not land after the pull's own update and hide it.
        self._catalog_lock = asyncio.Lock()
        self.reservations: DiskReservations | None = None  # made once Redis is there (run)

    def stop(self) -> None:
        self._stop.set()

    async def run(self, redis: ArqRedis | None = None) -> None:
        redis = self._redis = redis or await connect(self.settings.redis_url)
        self.reservations = DiskReservations(redis, self.store_id)
        self.server.blob_receiver = BlobReceiver(self.store, self.reservations, self._blob_stored)
        try:
            await self.server.start(self.settings, redis)
        except StoreServerError as exc:
            await redis.aclose()
            raise VllamaError(f"store {self.store_id}: {exc}", ErrorCode.UNAVAILABLE) from exc
        # Redis may restart while this process starts (on a busy machine that takes seconds):
        # the first catalog write waits for it, as every later one does.
        await until_redis_answers(self._resync, f"store {self.store_id}: listing its models")
        log.info("store %s: %d models in %s", self.store_id, len(self.store.list()), self.store.root)
        self._sink = FrameSink(redis)
        self._sink.start()
        beat = asyncio.create_task(self._heartbeat(), name="store-heartbeat")
        arq = JobConsumer(
            functions=[
                job_function(self.pull, name="pull", max_tries=1, timeout=PULL_TIMEOUT_S, keep_result=0),
                job_function(self.delete, name="delete", max_tries=1, timeout=600),
                job_function(self.copy, name="copy", max_tries=1, timeout=600),
                job_function(self.create, name="create", max_tries=1, timeout=600),
                job_function(self.tensors, name="tensors", max_tries=1, timeout=120),
                job_function(self.push, name="push", max_tries=1, timeout=PULL_TIMEOUT_S,
                             keep_result=self.settings.keep_result_s),
                job_function(self.create_from_files, name="create_from_files", max_tries=1,
                             timeout=CREATE_FROM_FILES_TIMEOUT_S),
            ],
            queue_name=keys.store_queue(self.store_id),
            redis_pool=redis,
            max_jobs=8,
            poll_delay=self.settings.poll_delay_s,  # only the fallback: it is woken for each job and abort
            wake_ups=True,
            keep_result=60,  # delete and copy: the API reads the outcome within seconds
            job_serializer=job_serializer,
            job_deserializer=job_deserializer,
            handle_signals=False,
            health_check_interval=60,
            retry_jobs=False,
        )
        wakeups = WakeupListener(redis)
        wakeups.add(arq)
        wakeups.start()
        consume = asyncio.create_task(arq.async_run(), name="store-jobs")
        try:
            await asyncio.wait({consume, asyncio.create_task(self._stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
            if consume.done():
                consume.result()
        finally:
            await cancel_and_wait(consume)
            await wakeups.stop()
            await cancel_and_wait(beat)
            await self._sink.stop()
            await catalog.remove_store(redis, self.store_id)
            await self.server.stop()
            await redis.aclose()

    async def _resync(self) -> frozenset:
        """Make the Redis catalog equal to the manifests on disk; returns the version synced."""
        async with self._catalog_lock:
            version = self.store.version()
            await catalog.reset(self._redis, self.store_id, await asyncio.to_thread(self.store.list))
            await blob_catalog.reset(self._redis, self.store_id, await asyncio.to_thread(list_blobs, self.store))
            return version

    async def _blob_stored(self, sha: str, size: int) -> None:
        """An upload landed (workers/blobs.py); under the catalog lock so that a resync that
        listed the disk before it cannot overwrite the record after it."""
        async with self._catalog_lock:
            await blob_catalog.put(self._redis, self.store_id, sha, size)

    async def _sweep_blobs(self) -> None:
        """Blobs no model uses, past their day (workers/blobs.py), leave the disk and Redis."""
        async with self._catalog_lock:
            removed = await asyncio.to_thread(sweep, self.store)
            await blob_catalog.remove(self._redis, self.store_id, removed)

    async def _heartbeat(self) -> None:
        seen = self.store.version()
        beats = 0
        synced = float("-inf")
        swept = float("-inf")
        while True:
            try:
                if time.monotonic() - synced > clock.RESYNC_S:
                    await clock.sync(self._redis)  # pull states are stamped for other machines
                    synced = time.monotonic()
                if time.monotonic() - swept > SWEEP_EVERY_S:
                    swept = time.monotonic()
                    await self._sweep_blobs()
                if self.store.version() != seen:
                    # Changed behind our back (`vllama create`, a file removed by hand).
                    seen = await self._resync()
                info = catalog.StoreInfo(
                    store_id=self.store_id, host=socket.gethostname(), pid=os.getpid(),
                    root=str(self.store.root), free_bytes=await asyncio.to_thread(self.store.free_bytes),
                    url=self.server.url, token=self.server.token,
                )
                if not await catalog.publish_store(self._redis, info, self.settings.heartbeat_ttl_s) and beats:
                    # Our record was gone: Redis lost its data (a restart without persistence)
                    # or we were silent past the TTL. The catalog may be gone with it.
                    log.warning("store %s: its Redis record had vanished; writing the catalog again", self.store_id)
                    seen = await self._resync()
                beats += 1
            except Exception:  # noqa: BLE001 - a Redis blip must not end the heartbeat
                log.warning("store heartbeat failed", exc_info=True)
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    # ------------------------------------------------------------ jobs

    async def pull(self, ctx: dict, model: str) -> None:
        name = canonical_name(model)  # as asked: the pull's record and frames go by it
        publisher = FramePublisher(self._sink, ctx["job_id"])
        alive = keys.pull_alive(self.store_id, name)
        changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        progress = Progress(PullState(model=name, store_id=self.store_id),
                            notify=lambda: loop.call_soon_threadsafe(changed.set))
        reservation = f"{name} {secrets.token_hex(6)}"
        try:
            manifest = await self._download(name, progress, changed, publisher, alive, reservation)
            async with self._catalog_lock:
                if manifest.name == name:
                    await catalog.put(self._redis, self.store_id, manifest)
                else:  # kept under the Hub's spelling of the repo id, which replaced any other
                    await catalog.reset(self._redis, self.store_id, await asyncio.to_thread(self.store.list))
            # Only now: a client told "success" lists the model and runs it at once.
            progress.phase("success")
            await self._publish(publisher, progress.snapshot())
            log.info("pulled %s into %s", name, self.store.root)
        except asyncio.CancelledError:
            message = "the pull worker stopped during the pull; pull again: files already fetched are kept"
            await asyncio.shield(self._publish(publisher, self._failed(progress, ErrorCode.UNAVAILABLE, message)))
            raise
        except VllamaError as exc:
            await self._publish(publisher, self._failed(progress, exc.code, exc.message))
            log.warning("pull %s failed: %s", name, exc.message)
        except Exception as exc:  # noqa: BLE001 - the client must hear about any failure
            log.exception("pull %s failed", name)
            await self._publish(publisher, self._failed(progress, ErrorCode.INTERNAL, f"pull failed: {without_paths(str(exc))}"))
        finally:
            await asyncio.shield(self._redis.delete(alive))

    async def _download(self, name: str, progress: Progress, changed: asyncio.Event,
                        publisher: FramePublisher, alive: str, reservation: str) -> catalog.Manifest:
        """Run the pull in a thread; publish its state when it changes (at most every
        PUBLISH_EVERY_S); every heartbeat, say it is alive and renew its disk reservation with
        the bytes it has yet to write."""
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        await self._redis.set(alive, self.store_id, px=ttl_ms)
        entry = await catalog.lookup(self._redis, name)  # what the other stores hold, and serve
        space = ReservedSpace(self.reservations, reservation, self.store.free_bytes, asyncio.get_running_loop())
        work = _in_daemon_thread(pull, self.store, name, progress, entry, space)
        try:
            return await self._follow(work, progress, changed, publisher, alive, reservation)
        finally:
            # Before the client hears the outcome: one told "success" may pull the next model.
            await asyncio.shield(self.reservations.release(reservation))

    async def _follow(self, work: asyncio.Future, progress: Progress, changed: asyncio.Event,
                      publisher: FramePublisher, alive: str, reservation: str) -> catalog.Manifest:
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        while True:
            waiter = asyncio.ensure_future(changed.wait())
            await asyncio.wait({work, waiter}, timeout=self.settings.heartbeat_interval_s,
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            await self._redis.set(alive, self.store_id, px=ttl_ms)
            remaining = sum(f.total - f.completed for f in progress.snapshot().files)
            await self.reservations.renew(reservation, remaining)
            if work.done():
                return work.result()
            if changed.is_set():
                changed.clear()
                await self._publish(publisher, progress.snapshot())
                await asyncio.sleep(PUBLISH_EVERY_S)

    @staticmethod
    def _failed(progress: Progress, code: str, message: str) -> PullState:
        state = progress.snapshot()
        state.status, state.code, state.error = "failed", code, message
        return state

    async def _publish(self, publisher: FramePublisher, state: PullState) -> None:
        await self._redis.set(keys.pull_record(self.store_id, state.model), state.model_dump_json(),
                              ex=self.settings.keep_result_s)
        await publisher.send(PullFrame, state=state)

    async def delete(self, _ctx: dict, model: str) -> dict[str, Any]:
        """The model, or, when this store lists no such model, what failed or interrupted
        pulls of it left (``leftovers``: files and folders removed)."""
        name = canonical_name(model)
        async with self._catalog_lock:
            deleted = await asyncio.to_thread(self.store.delete, name)
            if deleted is not None:
                await catalog.remove(self._redis, self.store_id, deleted.name)
                return {"deleted": True, "leftovers": 0}
        leftovers = await asyncio.to_thread(self.store.delete_leftovers, name)
        if leftovers:
            log.info("removed %d files and folders that pulls of %s left", leftovers, name)
        return {"deleted": False, "leftovers": leftovers}

    async def copy(self, _ctx: dict, source: str, destination: str) -> dict[str, Any]:
        async with self._catalog_lock:
            copied = await asyncio.to_thread(self.store.copy, canonical_name(source), canonical_name(destination))
            if copied is not None:
                await catalog.put(self._redis, self.store_id, copied)
        return {"copied": copied is not None}

    async def create(self, _ctx: dict, source: str, destination: str, changes: dict[str, Any]) -> dict[str, Any]:
        """/api/create from an existing model (workers/store.py's create)."""
        async with self._catalog_lock:
            created = await asyncio.to_thread(self.store.create, canonical_name(source), canonical_name(destination),
                                              changes)
            if created is not None:
                await catalog.put(self._redis, self.store_id, created)
        return {"created": created is not None}

    async def push(self, ctx: dict, model: str, repo: str, revision: str) -> dict[str, Any]:
        """/api/push: upload a model of this store to a Hugging Face repo (workers/push.py)."""
        name = canonical_name(model)
        job = PushJob(self._redis, self._sink, self.settings, self.store_id, ctx["job_id"], name, repo, revision)
        return await job.run(lambda progress: _in_daemon_thread(push_model, self.store, name, repo, revision,
                                                                progress))

    async def tensors(self, _ctx: dict, model: str) -> list[dict[str, Any]]:
        """The model's weight tensors (name, type, shape), for /api/show's verbose view."""
        manifest = self.store.get(canonical_name(model))
        if manifest is None:
            return []
        return await asyncio.to_thread(model_info.tensors, self.store.model_dir(manifest))

    async def create_from_files(self, _ctx: dict, destination: str, files: dict[str, str],
                                changes: dict[str, Any]) -> dict[str, Any]:
        """/api/create with ``files`` (workers/blob_models.py). Failures come back as
        ``{"error", "code"}``, so the API answers with the right status and message."""
        name = canonical_name(destination)
        reservation = f"{name} {secrets.token_hex(6)}"
        try:
            held = await blob_catalog.holders(self._redis, sorted(set(files.values())))
            holders = {sha: [s for s, _ in found if s.store_id != self.store_id and s.url] for sha, found in held.items()}
            sizes = {sha: found[0][1] for sha, found in held.items() if found}
            space = ReservedSpace(self.reservations, reservation, self.store.free_bytes, asyncio.get_running_loop())
            work = _in_daemon_thread(create_from_blobs, self.store, name, files, changes, holders, sizes, space)
            while not work.done():  # the space held for blobs it fetches must not lapse meanwhile
                await asyncio.wait({work}, timeout=self.settings.heartbeat_interval_s)
                held = (await self.reservations.held()).get(reservation)
                if held is not None:
                    await self.reservations.renew(reservation, held)
            manifest, fetched = work.result()
            async with self._catalog_lock:
                for sha in fetched:
                    await blob_catalog.put(self._redis, self.store_id, sha, sizes[sha])
                await catalog.put(self._redis, self.store_id, manifest)
            log.info("created %s from %d uploaded files", name, len(files))
            return {"created": True, "digest": manifest.digest}
        except VllamaError as exc:
            log.warning("creating %s from uploaded files failed: %s", name, exc.message)
            return {"error": exc.message, "code": str(exc.code)}
        except Exception as exc:  # noqa: BLE001 - the client must hear about any failure
            log.exception("creating %s from uploaded files failed", name)
            return {"error": f"creating {name} failed: {without_paths(str(exc))}", "code": str(ErrorCode.INTERNAL)}
        finally:
            await asyncio.shield(self.reservations.release(reservation))


def _in_daemon_thread(fn: Any, *args: Any) -> asyncio.Future:
    """Run blocking ``fn`` in a daemon thread: a download must not hold up the process's
    exit (asyncio.to_thread's executor is joined when the loop closes)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=target, name="vllama-pull", daemon=True).start()
    return future


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def run_pull_worker(settings: Settings) -> None:
    """Entry point of `vllama pull-worker`."""
    try:
        run_until_signalled(lambda: PullWorker(settings))
    except VllamaError as exc:  # e.g. VLLAMA_STORE_PORT taken: say so, no traceback
        log.error("pull worker cannot start: %s", exc.message)
        raise SystemExit(1) from None
