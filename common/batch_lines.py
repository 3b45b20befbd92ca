"""How one line of an OpenAI batch ended, written once.

Each line of a batch runs as a batch-class job; when it ends (answered, failed, cancelled)
its outcome goes into the batch's results hash under the line's index, and the batch's
counters move, in one atomic step that happens only for the first outcome of a line. So a
line is never counted twice, whoever writes it: the worker that ran it, or the API for a line
that never ran (invalid, withdrawn from the queue on cancel). The API turns the results into
OpenAI's output and error files once every line has one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel
from redis.asyncio import Redis

from common import keys
from common.protocol import BatchRef, JobResult

_RECORD_ONCE = """
-- KEYS: results hash, counts hash; ARGV: line index, outcome JSON, counter, ttl s
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""


class LineError(BaseModel):
    status: int  # the HTTP status the request would have had
    code: str
    message: str


class LineOutcome(BaseModel):
    status: Literal["done", "failed", "cancelled"]
    job_id: str | None = None
    result: JobResult | None = None
    error: LineError | None = None


async def record(redis: Redis, ref: BatchRef, outcome: LineOutcome) -> bool:
    """Write ``outcome`` unless the line already has one; True if this one counted."""
    counter = "completed" if outcome.status == "done" else "failed"
    return bool(await redis.eval(_RECORD_ONCE, 2, keys.batch_results(ref.batch_id), keys.batch_counts(ref.batch_id),
                                 ref.index, outcome.model_dump_json(), counter, ref.ttl_s))


async def record_many(redis: Redis, outcomes: list[tuple[BatchRef, LineOutcome]]) -> None:
    """``record`` for many lines in one round trip (a batch's lines that cannot run, found when
    it is created), each still written only if its line has no outcome yet."""
    if not outcomes:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for ref, outcome in outcomes:
            counter = "completed" if outcome.status == "done" else "failed"
            pipe.eval(_RECORD_ONCE, 2, keys.batch_results(ref.batch_id), keys.batch_counts(ref.batch_id),
                      ref.index, outcome.model_dump_json(), counter, ref.ttl_s)
        await pipe.execute()
