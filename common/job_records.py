"""``vllama:job:<id>``: one JSON record per job saying where it is and how it ended.

Written by the API (queued, cancelled before start, lost with its worker) and by the worker
(running, done, failed, cancelled); the latest write wins. For operators (redis-cli) and for
the jobs API; arq's own keys hold the job spec and the answer.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from redis.asyncio import Redis

from common import keys
from common.protocol import GenerationJob

Status = Literal["queued", "running", "done", "failed", "cancelled"]


def encode(job: GenerationJob, status: Status, **fields: Any) -> str:
    return json.dumps({
        "job_id": job.job_id,
        "model": job.model,
        "kind": job.kind,
        "priority": job.priority,
        "async": not job.stream,
        "status": status,
        "created_at": job.created_at,
        "updated_at": time.time(),
        **fields,
    })


async def write(redis: Redis, job: GenerationJob, status: Status, ttl_s: int, **fields: Any) -> None:
    await redis.set(keys.job_record(job.job_id), encode(job, status, **fields), ex=ttl_s)
