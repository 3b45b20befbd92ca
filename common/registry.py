"""The worker registry: who is alive, what it serves, how busy it is.

Each worker refreshes ``vllama:worker:<id>`` (JSON, short TTL) and its entry in the
``vllama:workers`` zset every heartbeat. A worker that dies simply stops refreshing: its key
expires within the TTL, which is how the API notices a dead worker within seconds.

Liveness is judged by Redis alone (does the record's key still exist?), never by comparing
a time written by one machine with another machine's clock: a host whose clock is off by
minutes must not look dead, nor a dead one alive. The zset is only an index of ids.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from common import clock, keys
from common.metrics import ModelStats


class ModelStatus(BaseModel):
    """One model a worker holds (or is loading)."""

    name: str
    state: Literal["loading", "ready", "unloading", "failed"]  # failed: its engine died
    running: int = 0
    max_jobs: int = 0
    context_length: int = 0
    size: int = 0  # bytes of its files on disk
    size_vram: int = 0  # bytes of GPU memory it holds (0 on CPU)
    loaded_at: float = 0.0
    expires_at: float | None = None  # when it unloads if still idle; None: never
    stats: ModelStats | None = None  # cumulative since it was loaded (for /metrics)


class WorkerInfo(BaseModel):
    worker_id: str
    host: str
    pid: int
    models: list[str]  # names of the models it holds or is loading: where jobs are routed
    loaded: list[ModelStatus] = []
    may_load: list[str] = ["*"]  # patterns of models it may load on demand
    max_loaded: int = 1
    state: Literal["loading", "ready", "draining"]
    running: int = 0  # jobs this worker is running
    engine_requests: int = 0  # requests inside the engines (0 soon after every job ends or aborts)
    max_jobs: int = 0
    max_model_len: int = 0
    started_at: float
    heartbeat_at: float

    def status_of(self, model: str) -> ModelStatus | None:
        return next((m for m in self.loaded if m.name == model), None)

    def allows(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.may_load)


def publish_heartbeat(client: SyncRedis, info: WorkerInfo, ttl_s: float) -> None:
    """Synchronous on purpose: workers beat from a thread of their own (workers/heartbeat.py)."""
    info.heartbeat_at = clock.now()
    ttl_ms = int(ttl_s * 1000)
    with client.pipeline(transaction=False) as pipe:
        pipe.set(keys.worker_record(info.worker_id), info.model_dump_json(), px=ttl_ms)
        pipe.zadd(keys.WORKERS, {info.worker_id: int(info.heartbeat_at * 1000)})
        # What the API routes by (api/routing.py): the count of the jobs it runs (kept by its
        # claims and ends, which Redis orders) lives as long as the worker; lapsed routes go.
        pipe.pexpire(keys.busy(info.worker_id), ttl_ms)
        pipe.zremrangebyscore(keys.routed(info.worker_id), "-inf", int(info.heartbeat_at * 1000))
        pipe.execute()


async def remove_worker(redis: Redis, worker_id: str) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.delete(keys.worker_record(worker_id))
        pipe.zrem(keys.WORKERS, worker_id)
        await pipe.execute()


async def live_records(redis: Redis, members: str, record_key: Callable[[str], str]) -> list[bytes]:
    """The records of the members of a heartbeat index (workers, stores) whose record has not
    expired; prunes the others from the index. A member that beats again is added back."""
    ids = [i.decode() if isinstance(i, bytes) else i for i in await redis.zrange(members, 0, -1)]
    if not ids:
        return []
    records = await redis.mget([record_key(i) for i in ids])
    gone = [i for i, r in zip(ids, records) if r is None]
    if gone:
        await redis.zrem(members, *gone)
    return [r for r in records if r is not None]


async def live_workers(redis: Redis) -> list[WorkerInfo]:
    """Workers whose heartbeat record has not expired (Redis judges the TTL)."""
    return [WorkerInfo.model_validate_json(r) for r in await live_records(redis, keys.WORKERS, keys.worker_record)]


async def worker_alive(redis: Redis, worker_id: str) -> bool:
    return bool(await redis.exists(keys.worker_record(worker_id)))
