"""arq's Worker with a cheaper poll for a worker that runs many long jobs at once.

arq leaves a running job in the queue zset until it ends, and every poll (every 10 ms here)
re-reads the queue and checks each listed job with its own WATCH/MULTI transaction, about
four round trips per running job. With 32 streams in flight that was over 12,000 Redis
commands a second and most of the worker's and Redis's CPU. Here jobs this worker already
runs are skipped locally and the rest are filtered with one pipelined EXISTS on their
in-progress markers; only jobs that look free go through arq's own (race-safe) start.
It also survives Redis going away for a while, where arq's worker would exit.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq.worker import Worker
from redis.exceptions import RedisError

from common.job_queue import in_progress_key
from common.tasks import until_redis_answers

log = logging.getLogger(__name__)


class GenerationArqWorker(Worker):
    async def _poll_iteration(self) -> None:
        # arq ends the worker on the first Redis error of its poll loop; a Redis restart
        # would then cost a model reload. Keep polling until Redis is back.
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as exc:
            log.warning("Redis unreachable (%s); retrying in 1 s", exc)
            await asyncio.sleep(1)

    async def finish_job(self, job_id: str, *args: Any) -> None:
        # arq's end of a job (result, in-progress marker, queue entry), kept through a Redis
        # restart or failover: lost, the queue would count the job as running for an hour.
        await until_redis_answers(lambda: super(GenerationArqWorker, self).finish_job(job_id, *args),
                                  f"end of job {job_id}")

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        await until_redis_answers(lambda: super(GenerationArqWorker, self).finish_failed_job(job_id, result_data),
                                  f"end of job {job_id}")

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        candidates = [j for j in job_ids if j.decode() not in self.tasks]
        if candidates:
            async with self.pool.pipeline(transaction=False) as pipe:
                for job_id in candidates:
                    pipe.exists(in_progress_key(job_id.decode()))
                running = await pipe.execute()
            candidates = [j for j, busy in zip(candidates, running) if not busy]
        if candidates:
            await super().start_jobs(candidates)
