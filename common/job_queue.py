"""The one owner of what arq keeps in Redis, and of our job records beside it.

arq stores a job as a payload key (``arq:job:<id>``), a member of its queue's zset, an
in-progress marker while a worker runs it (``arq:in-progress:<id>``), a result key once it
ended (``arq:result:<id>``) and, to cancel, a member of the abort zset. Everything in vLLama
that enqueues, withdraws, aborts or forgets a job, asks whether one is running or still
exists, or settles a job whose worker died, does it through this module, and workers take
jobs with common/job_consumer.py's JobConsumer, so an arq upgrade is a change in these two
and the messages a client reads are the same wherever the fault is found.

Every enqueue and abort also wakes the workers (keys.WAKEUP), which otherwise look at their
queues only rarely.

Admission and enqueue are one Lua script: checking the queue's length and then enqueueing
would let a burst of requests all see the same short queue and all get in.

What is kept, and how long: nothing that nothing reads. A streamed job's answer reaches its
client as frames, so arq keeps no result of it (keep_no_result) and its record lives a minute
once it ended (record_ttl); async jobs and batch lines keep both for VLLAMA_KEEP_RESULT_S.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import arq.connections
import arq.jobs
import arq.worker
from arq.connections import ArqRedis
from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.jobs import Job, JobResult, serialize_job

from common import clock, keys, prefixes, registry
from common.errors import ServerBusy, VllamaError
from common.pipelined import Pipelined
from common.protocol import GenerationJob
from common.records import JobRecord, JobStatus
from common.redis_conn import job_deserializer, job_serializer

log = logging.getLogger(__name__)


def _use_cluster_clock() -> None:
    """arq scores a queue's jobs by enqueue time and a worker takes only those scored up to
    its own "now": a worker whose clock is 30 s behind the API's would see each job 30 s late,
    after others took it. Every arq timestamp in our processes is cluster time instead
    (common/clock.py), which all machines agree on."""
    for module in (arq.worker, arq.connections, arq.jobs):
        module.timestamp_ms = clock.now_ms


_use_cluster_clock()

# How long a queued job may wait before arq drops it as expired (arq's default too).
JOB_EXPIRES_MS = 24 * 3600 * 1000

# The record of a streamed job (one with a listener) once it ended. Its client already has
# the answer or the error, so nothing reads the record again; it stays a minute for an
# operator's redis-cli, and every write of it carries this TTL, so a late or repeated write
# (a worker's final write sent again after a Redis blip) never keeps it for longer.
ENDED_STREAM_RECORD_S = 60

# An abort request (a member of arq's abort zset) that no worker took within this long is
# for a job no worker runs: it ended just before the abort came, or its worker died. arq
# means to drop such entries after a minute but drops the wrong ones (future scores), so the
# API's housekeeping prunes them (prune_aborts).
ABORT_KEEP_S = 60


def record_ttl(record: JobRecord, keep_result_s: int) -> int:
    """How long a job record is kept from this write on: VLLAMA_KEEP_RESULT_S while the job
    waits or runs (the dispatcher's checks and the sweep read it) and for async jobs (the jobs
    API reads them); ENDED_STREAM_RECORD_S for an ended job whose answer went to its client."""
    if record.finished and not record.is_async:
        return min(ENDED_STREAM_RECORD_S, keep_result_s)
    return keep_result_s

_ENQUEUE_IF_ROOM = """
-- KEYS: queue zset, arq job key, arq result key, our job record, the model's keep_alive,
--       the job's route hold, the routed worker's zset of routed jobs, its route counts
-- ARGV: queue limit, job payload, expires ms, score, job id, job record, record TTL s,
--       keep_alive seconds ('' = the worker's default), wake-up channel ('' = none),
--       routed worker ('' = none), hold ms, hold ends (ms), route count field, prefix TTL s,
--       then the prefix keys the routed worker now owns (api/routing.py)
if redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then return -1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
-- The record first: at maxmemory Redis refuses a script at its first write that may grow
-- the data (a DEL would let every later write through), so a full Redis writes nothing.
redis.call('SET', KEYS[4], ARGV[6], 'EX', ARGV[7])
if ARGV[8] == '' then redis.call('DEL', KEYS[5]) else redis.call('SET', KEYS[5], ARGV[8]) end
-- The route before the job is visible: no worker may take it in between unheld.
if ARGV[10] ~= '' then
  redis.call('SET', KEYS[6], ARGV[10], 'PX', ARGV[11])
  redis.call('ZADD', KEYS[7], ARGV[12], ARGV[5])
  redis.call('EXPIRE', KEYS[7], 3600)
  redis.call('HINCRBY', KEYS[8], ARGV[13], 1)
  redis.call('EXPIRE', KEYS[8], 86400)
  for i = 15, #ARGV do redis.call('SET', ARGV[i], ARGV[10], 'EX', ARGV[14]) end
end
redis.call('PSETEX', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[5])
-- Wake the queue's workers (PUBLISH is not refused at maxmemory, and runs only once queued).
if ARGV[9] ~= '' then redis.call('PUBLISH', ARGV[9], ARGV[4] .. ' ' .. KEYS[1]) end
return 1
"""
_ENQUEUED, _QUEUE_FULL = 1, 0
# Where a prepared job's arguments (script, key count, 8 keys, then ARGV) hold its queue, its
# score and the wake-up channel.
_QUEUE_ARG, _SCORE_ARG, _WAKEUP_ARG = 2, 13, 18


def wakeup_message(queue: str, score_ms: int) -> str:
    """What keys.WAKEUP carries for jobs queued in ``queue``, the last takeable at ``score_ms``."""
    return f"{score_ms} {queue}"


def abort_wakeup_message(job_id: str) -> str:
    """What keys.WAKEUP carries for an abort of ``job_id``."""
    return f"abort {job_id}"

# Take a queued job out of its queue unless a worker has started it (arq marks a job in
# progress before running it): 1 removed, 0 already running (abort it instead).
_WITHDRAW = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""

Whereabouts = Literal["queued", "running", "ended", "gone"]


# A job ready to enqueue: its id and the arguments of its enqueue script. A plain tuple of
# strings and numbers, which the garbage collector stops tracking (a NamedTuple it would not).
PreparedJob = tuple[str, tuple[Any, ...]]


def _outcome(job_id: str, outcome: int) -> VllamaError | None:
    if outcome == _QUEUE_FULL:
        return ServerBusy()
    if outcome != _ENQUEUED:
        return VllamaError(f"job id {job_id} already exists; retry the request")
    return None


def in_progress_key(job_id: str) -> str:
    """arq's marker of a job a worker has started (workers filter their polls with it)."""
    return in_progress_key_prefix + job_id


def worker_lost_message(worker_id: str | None) -> str:
    return (f"the worker running this request ({worker_id}) stopped responding; the answer is incomplete, "
            "retry the request")


JOB_LOST_MESSAGE = ("this request was lost from the queue (Redis restarted without its data, or the worker that "
                    "took it died before starting it); retry the request")


class JobQueue:
    """Jobs in arq's queues, as the API and the workers see them."""

    def __init__(self, redis: ArqRedis, keep_result_s: int) -> None:
        self.redis = redis
        self.keep_result_s = keep_result_s
        self._enqueues = Pipelined(redis)  # the enqueues of requests handled at the same moment, together

    # ------------------------------------------------------------ records

    async def write_record(self, record: JobRecord) -> None:
        record.updated_at = clock.now()
        await self.redis.set(keys.job_record(record.job_id), record.dump(), ex=record_ttl(record, self.keep_result_s))

    async def record(self, job_id: str) -> JobRecord | None:
        raw = await self.redis.get(keys.job_record(job_id))
        return None if raw is None else JobRecord.model_validate_json(raw)

    async def mark(self, job: GenerationJob, status: JobStatus, **fields: Any) -> None:
        await self.write_record(JobRecord.of(job, status, **fields))

    # ------------------------------------------------------------ generation jobs

    async def enqueue(self, job: GenerationJob, limit: int, keep_alive: float | None = None) -> None:
        """Enqueue ``job`` with its "queued" record, unless its queue already holds ``limit``
        jobs (running ones count: arq keeps them in the zset until they end): ServerBusy.
        Also records the request's keep_alive for the model (the latest request's wins, as in
        Ollama; None restores the default)."""
        job_id, args = self.prepare(job, limit, keep_alive)
        problem = _outcome(job_id, int(await self._enqueues.eval(*args)))
        if problem is not None:
            raise problem

    def prepare(self, job: GenerationJob, limit: int, keep_alive: float | None = None) -> PreparedJob:
        """What ``enqueue`` sends for ``job``, made ahead (by a batch, for all its lines before
        any is queued): strings and numbers only, which the garbage collector never scans,
        where thousands of job objects held until then would make its full passes long."""
        now_ms = int(clock.now() * 1000)
        payload = serialize_job("generate", (job.model_dump(mode="json"),), {}, None, now_ms,
                                serializer=job_serializer)
        job_id = job.job_id
        route = job.route
        worker = route.worker_id if route is not None else ""
        return (job_id, (
            _ENQUEUE_IF_ROOM, 8,
            keys.queue_for(job.model, job.priority), job_key_prefix + job_id, result_key_prefix + job_id,
            keys.job_record(job_id), keys.keep_alive(job.model), keys.route(job_id), keys.routed(worker),
            keys.route_counts(worker),
            limit, payload, JOB_EXPIRES_MS, now_ms, job_id, JobRecord.of(job, "queued").dump(), self.keep_result_s,
            "" if keep_alive is None else repr(keep_alive), keys.WAKEUP,
            worker, max(1, route.until_ms - now_ms) if route else 0, route.until_ms if route else 0,
            f"{job.model}\t{route.reason}" if route else "", prefixes.PREFIX_TTL_S,
            *(prefixes.owned_prefix_keys(job) if route else ()),
        ))

    async def enqueue_many(self, jobs: list[PreparedJob]) -> list[VllamaError | None]:
        """``enqueue`` for many prepared jobs (a batch's lines) in one round trip, each admitted
        on its own: for each, None if it was queued, else why not (ServerBusy: queue full).
        The workers are woken once per queue, after all of them, not once per job: a batch of
        thousands would otherwise send every worker thousands of messages."""
        if not jobs:
            return []
        newest: dict[str, int] = {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, args in jobs:
                queue, score = args[_QUEUE_ARG], args[_SCORE_ARG]
                newest[queue] = max(score, newest.get(queue, score))
                pipe.eval(*args[:_WAKEUP_ARG], "", *args[_WAKEUP_ARG + 1:])
            for queue, score in newest.items():
                pipe.publish(keys.WAKEUP, wakeup_message(queue, score))
            outcomes = await pipe.execute()
        return [_outcome(job_id, int(outcome)) for (job_id, _), outcome in zip(jobs, outcomes)]

    async def withdraw(self, queue: str, job_id: str) -> bool:
        """Remove a job no worker has started; False if one has."""
        return bool(await self.redis.eval(_WITHDRAW, 3, queue, job_key_prefix + job_id, in_progress_key(job_id),
                                          job_id))

    async def abort(self, job_id: str) -> None:
        """Ask arq to abort the job: a queued job never starts, a running one is cancelled in
        its worker, which aborts the engine request. Its worker is woken to do so at once."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(abort_jobs_ss, {job_id: int(clock.now() * 1000)})
            pipe.publish(keys.WAKEUP, abort_wakeup_message(job_id))
            await pipe.execute()

    async def cancel(self, record: JobRecord) -> bool:
        """Withdraw the job if it is still queued (recorded cancelled here: True), else abort it
        (its worker records how it ended: False)."""
        if await self.withdraw(keys.queue_for(record.model, record.priority), record.job_id):
            await self.write_record(record.ended("cancelled", "cancelled before it started"))
            return True
        await self.abort(record.job_id)
        return False

    async def prune_aborts(self) -> int:
        """Drop abort requests older than ABORT_KEEP_S (see there); returns how many. Left in
        place, they would pile up for good, one per request cancelled just as it ended."""
        cutoff = int(clock.now() * 1000) - ABORT_KEEP_S * 1000
        return int(await self.redis.zremrangebyscore(abort_jobs_ss, "-inf", cutoff))

    async def forget(self, queue: str, job_id: str) -> None:
        """Remove a job from arq's keys, for a job whose worker died: arq would otherwise keep
        it "in progress" until its timeout ran out (an hour, a day) and only then drop it, and
        a stream cannot be resumed, so it must not run later either."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(queue, job_id)
            pipe.delete(job_key_prefix + job_id, in_progress_key(job_id), retry_key_prefix + job_id)
            await pipe.execute()

    async def whereabouts(self, job_id: str) -> Whereabouts:
        """Where arq has the job: waiting, started by a worker, ended (a result is kept), or
        gone: none of these, as when Redis lost its data or the job was forgotten."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(in_progress_key(job_id))
            pipe.exists(result_key_prefix + job_id)
            pipe.exists(job_key_prefix + job_id)
            running, ended, payload = await pipe.execute()
        if running:
            return "running"
        if ended:
            return "ended"
        return "queued" if payload else "gone"

    async def ended_unrun(self, job_ids: list[str]) -> list[bool]:
        """For each job: did arq end it (a result is kept)? A job whose record still says
        queued and that has a result was aborted just as a worker took it, so never ran."""
        if not job_ids:
            return []
        return [r is not None for r in await self.redis.mget([result_key_prefix + j for j in job_ids])]

    async def settle_lost(self, record: JobRecord) -> JobRecord | None:
        """A job recorded as running whose worker's heartbeat has lapsed: record it failed and
        forget it in arq. Returns the new record, or None if its worker is alive."""
        if record.status != "running" or await registry.worker_alive(self.redis, record.worker_id or ""):
            return None
        lost = record.ended("failed", worker_lost_message(record.worker_id))
        await self.write_record(lost)
        await self.redis.hdel(keys.RUNNING, record.job_id)
        await self.forget(keys.queue_for(record.model, record.priority), record.job_id)
        return lost

    async def sweep_lost(self) -> int:
        """Fail the jobs of workers whose heartbeat lapsed (``vllama:running``), so their
        records, the jobs list and redis-cli stop calling them running or queued and arq stops
        counting them; returns how many. A job the worker had taken but not started yet is
        failed too: arq's in-progress marker would keep every other worker off it until the
        job timeout. Jobs with a listener are usually settled sooner by their stream's own
        check; this catches the rest (async jobs, batch lines)."""
        running = {k.decode(): v.decode() for k, v in (await self.redis.hgetall(keys.RUNNING)).items()}
        workers = sorted(set(running.values()))
        if not workers:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id in workers:
                pipe.exists(keys.worker_record(worker_id))
            alive = dict(zip(workers, await pipe.execute()))
        lost = [job_id for job_id, worker_id in running.items() if not alive[worker_id]]
        for job_id in lost:
            record = await self.record(job_id)
            if record is not None and record.status == "queued":
                await self.write_record(record.ended("failed", JOB_LOST_MESSAGE))
                await self.forget(keys.queue_for(record.model, record.priority), job_id)
            elif record is not None:
                await self.settle_lost(record)
            await self.redis.hdel(keys.RUNNING, job_id)
        return len(lost)

    # ------------------------------------------------------------ store jobs (pull, delete, copy)

    async def enqueue_store_job(self, store_id: str, function: str, *args: Any, job_id: str | None = None
                                ) -> str | None:
        """A job for one store's pull worker: its id, or None if a job with ``job_id`` is
        already there."""
        queue = keys.store_queue(store_id)
        job = await self.redis.enqueue_job(function, *args, _job_id=job_id, _queue_name=queue)
        if job is None:
            return None
        await self.redis.publish(keys.WAKEUP, wakeup_message(queue, clock.now_ms()))
        return job.job_id

    async def store_job_result(self, store_id: str, job_id: str) -> JobResult | None:
        """How a store job ended, None while it has not."""
        job = Job(job_id, self.redis, _queue_name=keys.store_queue(store_id), _deserializer=job_deserializer)
        return await job.result_info()

    async def store_job_orphaned(self, job_id: str, alive_key: str) -> bool:
        """arq still counts a store job as running, but its worker no longer says it runs it
        (``alive_key`` lapsed): the worker was killed."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(in_progress_key(job_id))
            pipe.exists(alive_key)
            in_progress, alive = await pipe.execute()
        return bool(in_progress) and not alive


# ---------------------------------------------------------------- the consuming side
# (JobConsumer itself is in common/job_consumer.py)

# How a consumer declares the functions it runs (name, timeout, tries, result kept).
job_function = arq.worker.func

# Where a JobConsumer's job context holds the ids of running jobs whose result is not kept.
RESULT_UNKEPT = "vllama_result_unkept"


def keep_no_result(ctx: dict) -> None:
    """Called by a job function whose outcome reaches its caller another way (a streamed
    job's frames): arq keeps no result for it, whatever the consumer's keep_result. arq only
    decides per function, and one function serves both streamed and async jobs."""
    unkept = ctx.get(RESULT_UNKEPT)
    if unkept is not None:
        unkept.add(ctx["job_id"])
