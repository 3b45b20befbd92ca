"""The whole stack in the test's event loop, with the fake engine: real Redis, real HTTP
(uvicorn on a free port), the real worker and arq; only the model is simulated."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import uvicorn

from api.app import create_app
from cli.embedded_redis import free_port
from common import registry
from common.redis_conn import connect
from common.settings import Settings
from workers.fake_engine import FakeEngine
from workers.main import GenerationWorker
from workers.pull_worker import PullWorker

MODEL = "fake:test"


@dataclass
class FakeStack:
    base_url: str
    settings: Settings
    engine: FakeEngine
    worker: GenerationWorker | None
    redis: object
    pull_worker: PullWorker | None = None

    def client(self, **kw) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=30, **kw)


@asynccontextmanager
async def fake_stack(redis_url: str, *, worker: bool = True, engine: FakeEngine | None = None,
                     pull_worker: bool = False, engine_factory=None, flush: bool = True, **overrides):
    """``pull_worker``: also run a store (settings.home must then be a temporary directory);
    ``engine_factory(name, path)``: the engines of models loaded on demand; ``flush``: start
    from an empty Redis (False: join what another stack left there)."""
    # A 3 s heartbeat TTL: a worker sharing a busy 2-core machine with the test must not
    # look dead; tests about dead workers wait that much longer.
    settings = Settings(**{"redis_url": redis_url, "model": MODEL, "heartbeat_interval_s": 0.25,
                           "heartbeat_ttl_s": 3.0, "engine": "fake", **overrides})
    redis = await connect(redis_url)
    if flush:
        await redis.flushdb()
    engine = engine or FakeEngine()
    store_obj = store_task = None
    if pull_worker:
        store_obj = PullWorker(settings)
        store_task = asyncio.create_task(store_obj.run(redis=await connect(redis_url)))
    worker_obj = worker_task = None
    if worker:
        factory = engine_factory or (lambda name, path: FakeEngine())
        worker_obj = GenerationWorker(settings, engine=engine, engine_factory=factory)
        worker_task = asyncio.create_task(worker_obj.run(redis=await connect(redis_url)))

        async def ready() -> bool:
            live = await registry.live_workers(redis)
            return any(w.state == "ready" for w in live)

        from tests.harness import async_wait_until

        await async_wait_until(ready, 10, "the fake worker to be ready")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    server_task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield FakeStack(f"http://127.0.0.1:{port}", settings, engine, worker_obj, redis, store_obj)
    finally:
        server.should_exit = True
        await server_task
        if worker_obj is not None:
            worker_obj.stop()
            await worker_task
        if store_obj is not None:
            store_obj.stop()
            await store_task
        await redis.aclose()
