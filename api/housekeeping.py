"""What every API process does in the background: keep its clock in step with Redis's
(common/clock.py), sweep up jobs whose worker died without anyone watching them, and prune
the keys that have no TTL of their own (api/pruning.py).

The sweep runs on one replica at a time (a short lock in Redis), every few heartbeats: a
job with a client is settled sooner by its stream's own check, so this is for async jobs and
batch lines, whose records would otherwise say "running" until someone read them one by one.
The pruning rides on the same lock, so Redis's memory stays bounded with any number of
replicas doing the work of one.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from api import pruning
from common import clock, keys
from common.job_queue import JobQueue
from common.settings import Settings
from common.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class Housekeeping:
    def __init__(self, redis: Redis, queue: JobQueue, settings: Settings) -> None:
        self._redis = redis
        self._queue = queue
        self._settings = settings
        # Past the heartbeat TTL, so a dead worker's jobs are settled within about two TTLs.
        self._every_s = max(1.0, settings.heartbeat_ttl_s / 2)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        try:
            await clock.sync(self._redis)
        except Exception:  # noqa: BLE001 - Redis may come later; the loop measures again
            log.warning("could not read Redis's clock yet", exc_info=True)
        self._task = asyncio.create_task(self._run(), name="housekeeping")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        synced = time.monotonic()
        while True:
            await asyncio.sleep(self._every_s)
            try:
                if time.monotonic() - synced > clock.RESYNC_S:
                    await clock.sync(self._redis)
                    synced = time.monotonic()
                if await self._redis.set(keys.SWEEP_LOCK, "1", nx=True, px=int(self._every_s * 1000)):
                    if lost := await self._queue.sweep_lost():
                        log.warning("failed %d job(s) whose worker stopped responding", lost)
                    if pruned := await pruning.prune(self._redis, self._queue, self._settings):
                        log.debug("pruned %s", pruned)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:  # Redis away for a while: one line, try again next round
                log.warning("housekeeping skipped a round: Redis did not answer (%s)", exc)
            except Exception:  # noqa: BLE001 - a bug; keep the loop alive, and show where
                log.warning("housekeeping failed", exc_info=True)
