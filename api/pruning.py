"""Pruning rules for the keys that cannot have a TTL of their own.

Every key vLLama writes either expires (common/keys.py says after how long) or is a shared
index, whose members come and go while the key stays: a TTL on it would drop live members
with the dead. Such an index is kept bounded by a rule, applied here by the API's
housekeeping (api/housekeeping.py), once a round on one replica (the sweep lock):

- arq's abort set loses requests older than ABORT_KEEP_S (arq's own pruning drops the
  wrong end, so without this it grows by one per request cancelled just as it ended);
- the worker and store indexes lose members whose heartbeat record expired (readers do the
  same as they read, but an index nobody reads must not grow either);
- the load requests lose models asked for longer ago than VLLAMA_LOAD_TIMEOUT_S for which
  no job waits any more (the request that asked gave up, or its client left);
- the lists of async jobs, files and batches lose members older than their records' TTL.

``vllama:running`` is pruned by the sweep itself (common/job_queue.py sweep_lost).
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from common import catalog, clock, keys, registry
from common.job_queue import JobQueue
from common.settings import Settings


@dataclass
class Pruned:
    aborts: int = 0
    loads: int = 0
    listed: int = 0  # async jobs, files and batches dropped from their lists

    def __bool__(self) -> bool:
        return bool(self.aborts or self.loads or self.listed)


# Drop one load request if it is still as old (a request made meanwhile has a new score) and
# no job waits for its model. KEYS: loads zset, the model's two queues; ARGV: model, cutoff ms.
_DROP_STALE_LOAD = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
if redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3]) > 0 then return 0 end
return redis.call('ZREM', KEYS[1], ARGV[1])
"""


async def prune_loads(redis: Redis, load_timeout_s: float) -> int:
    """Drop load requests older than ``load_timeout_s`` whose model has no job waiting in
    either of its queues; returns how many. A request still waiting asks again (its quiet
    checks re-add the model), and a job still queued keeps its model's request."""
    cutoff = int((clock.now() - load_timeout_s) * 1000)
    stale = [m.decode() if isinstance(m, bytes) else m
             for m in await redis.zrangebyscore(keys.LOADS, "-inf", cutoff)]
    removed = 0
    for model in stale:
        removed += int(await redis.eval(_DROP_STALE_LOAD, 3, keys.LOADS, keys.generation_queue(model),
                                        keys.batch_queue(model), model, cutoff))
    return removed


async def prune_lists(redis: Redis, settings: Settings) -> int:
    """Drop async jobs (scored in ms), files and batches (scored in s) older than their
    records' TTL from the lists that name them; returns how many."""
    now = clock.now()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zremrangebyscore(keys.JOBS, "-inf", int((now - settings.keep_result_s) * 1000))
        pipe.zremrangebyscore(keys.FILES, "-inf", int(now - settings.file_ttl_s))
        pipe.zremrangebyscore(keys.BATCHES, "-inf", int(now - settings.file_ttl_s))
        return sum(int(n) for n in await pipe.execute())


async def prune(redis: Redis, queue: JobQueue, settings: Settings) -> Pruned:
    """Apply every rule once."""
    pruned = Pruned()
    pruned.aborts = await queue.prune_aborts()
    await registry.live_workers(redis)  # reading an index prunes it
    await catalog.live_stores(redis)
    pruned.loads = await prune_loads(redis, settings.load_timeout_s)
    pruned.listed = await prune_lists(redis, settings)
    return pruned
