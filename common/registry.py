"""The worker registry: who is alive, what it serves, how busy it is.

Each worker refreshes ``vllama:worker:<id>`` (JSON, short TTL) and its score in the
``vllama:workers`` zset every heartbeat. A worker that dies simply stops refreshing: its key
expires within the TTL, which is how the API notices a dead worker within seconds.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from common import keys


class WorkerInfo(BaseModel):
    worker_id: str
    host: str
    pid: int
    models: list[str]
    state: Literal["loading", "ready", "draining"]
    running: int = 0  # jobs this worker is running
    engine_requests: int = 0  # requests inside the engine (0 soon after every job ends or aborts)
    max_jobs: int = 0
    max_model_len: int = 0
    started_at: float
    heartbeat_at: float


def publish_heartbeat(client: SyncRedis, info: WorkerInfo, ttl_s: float) -> None:
    """Synchronous on purpose: workers beat from a thread of their own (workers/heartbeat.py)."""
    info.heartbeat_at = time.time()
    with client.pipeline(transaction=False) as pipe:
        pipe.set(keys.worker_record(info.worker_id), info.model_dump_json(), px=int(ttl_s * 1000))
        pipe.zadd(keys.WORKERS, {info.worker_id: int(info.heartbeat_at * 1000)})
        pipe.execute()


async def remove_worker(redis: Redis, worker_id: str) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.delete(keys.worker_record(worker_id))
        pipe.zrem(keys.WORKERS, worker_id)
        await pipe.execute()


async def live_workers(redis: Redis, ttl_s: float) -> list[WorkerInfo]:
    """Workers whose heartbeat is younger than ``ttl_s``; prunes the rest from the zset."""
    cutoff_ms = int((time.time() - ttl_s) * 1000)
    await redis.zremrangebyscore(keys.WORKERS, "-inf", cutoff_ms)
    ids = await redis.zrange(keys.WORKERS, 0, -1)
    if not ids:
        return []
    ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
    records = await redis.mget([keys.worker_record(i) for i in ids])
    return [WorkerInfo.model_validate_json(r) for r in records if r is not None]


async def worker_alive(redis: Redis, worker_id: str) -> bool:
    return bool(await redis.exists(keys.worker_record(worker_id)))
