"""Admission and enqueue in one atomic step.

Checking the queue length and then enqueueing would let a burst of requests all see the
same short queue and all get in; a Lua script makes the check and arq's enqueue (the same
two writes arq's ``enqueue_job`` does) one operation in Redis.
"""

from __future__ import annotations

import time

from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis

from common import job_records, keys
from common.protocol import GenerationJob
from common.redis_conn import job_serializer

# How long a queued job may wait before arq drops it as expired (arq's default too).
JOB_EXPIRES_MS = 24 * 3600 * 1000

_ENQUEUE_IF_ROOM = """
-- KEYS: queue zset, arq job key, arq result key, our job record, the model's keep_alive
-- ARGV: queue limit, job payload, expires ms, score, job id, job record, record TTL s,
--       keep_alive seconds ('' = the worker's default)
if redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then return -1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
if ARGV[8] == '' then redis.call('DEL', KEYS[5]) else redis.call('SET', KEYS[5], ARGV[8]) end
redis.call('SET', KEYS[4], ARGV[6], 'EX', ARGV[7])
redis.call('PSETEX', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[5])
return 1
"""

ENQUEUED, QUEUE_FULL, DUPLICATE_ID = 1, 0, -1


async def enqueue_if_room(
    redis: Redis, job: GenerationJob, function: str, limit: int, record_ttl_s: int,
    keep_alive: float | None = None,
) -> int:
    """Enqueue ``job`` for arq, with its "queued" record, unless its model's queue already
    holds ``limit`` jobs (running ones count: arq keeps them in the zset until they end).
    Also records the request's keep_alive for the model (the latest request's wins, as in
    Ollama; None restores the default). Returns ENQUEUED, QUEUE_FULL or DUPLICATE_ID."""
    now_ms = int(time.time() * 1000)
    payload = serialize_job(function, (job.model_dump(mode="json"),), {}, None, now_ms, serializer=job_serializer)
    job_id = job.job_id
    return int(await redis.eval(
        _ENQUEUE_IF_ROOM, 5,
        keys.queue_for(job.model, job.priority), job_key_prefix + job_id, result_key_prefix + job_id, keys.job_record(job_id),
        keys.keep_alive(job.model),
        limit, payload, JOB_EXPIRES_MS, now_ms, job_id, job_records.encode(job, "queued"), record_ttl_s,
        "" if keep_alive is None else repr(keep_alive),
    ))


async def forget_job(redis: Redis, queue: str, job_id: str) -> None:
    """Remove a job from arq's keys, for a job whose worker died: arq would otherwise keep it
    "in progress" until its timeout ran out (an hour, a day) and only then drop it."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(queue, job_id)
        pipe.delete(job_key_prefix + job_id, in_progress_key_prefix + job_id, retry_key_prefix + job_id)
        await pipe.execute()


# Take a queued job out of its queue unless a worker has started it (arq marks a job in
# progress before running it): 1 removed, 0 already running (abort it instead).
_WITHDRAW = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""


async def withdraw(redis: Redis, queue: str, job_id: str) -> bool:
    """Remove a job no worker has started; False if one has."""
    return bool(await redis.eval(_WITHDRAW, 3, queue, job_key_prefix + job_id, in_progress_key_prefix + job_id,
                                 job_id))
