"""How a worker takes jobs from an arq queue: JobConsumer, arq's Worker made cheap to run.

arq's worker polls its queue every ``poll_delay``; a worker of ours runs up to hundreds of
long jobs at once and should cost nothing while idle, so this one polls only when woken (a
job queued, an abort asked for, a slot freed with jobs waiting) and otherwise rarely, and
skips the jobs it runs already without a round trip each. Where arq keeps what is described
in common/job_queue.py, which also decides what results are kept (keep_no_result).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import arq.worker
from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.utils import to_ms
from arq.worker import Worker
from redis.exceptions import RedisError

from common import clock, keys
from common.job_queue import RESULT_UNKEPT, in_progress_key, job_function
from common.redis_conn import job_deserializer
from common.tasks import until_redis_answers

__all__ = ["JobConsumer", "job_function"]

log = logging.getLogger(__name__)


def _args_for_log(args: Any, kwargs: Any) -> str:
    """arq formats every job's arguments (a whole chat) for its "job started" log line before
    the logger decides to drop it; only do it when the line will be written."""
    return _arq_args_to_string(args, kwargs) if arq.worker.logger.isEnabledFor(logging.INFO) else ""


_arq_args_to_string = arq.worker.args_to_string
arq.worker.args_to_string = _args_for_log
# Before looking for a job it was told of, a worker waits up to this long at random (ties
# between idle workers), plus up to BUSY_WAIT_S the fuller its slots are (JobConsumer._turn_s).
TIE_BREAK_S = 0.001
BUSY_WAIT_S = 0.002
# Sends a job's end (commands for a pipeline) with the worker's next batch of writes.
EndWriter = Callable[[Callable[[Any], None]], Awaitable[Any]]


def _streamed(payload: bytes | None) -> bool:
    """Whether an arq job payload is a streamed generation job (its client reads frames)."""
    if payload is None:
        return False
    try:
        args = job_deserializer(payload).get("a") or []
    except (ValueError, AttributeError):
        return False
    return bool(args) and isinstance(args[0], dict) and args[0].get("stream") is True


class JobConsumer(Worker):
    """arq's Worker with a cheaper poll for a worker that runs many long jobs at once.

    arq leaves a running job in the queue zset until it ends, and every poll re-reads the
    queue and checks each listed job with its own WATCH/MULTI transaction, about four round
    trips per job. With 32 streams in flight and a poll every 10 ms that was over 12,000
    Redis commands a second and most of the worker's and Redis's CPU. Here jobs this worker
    already runs are skipped locally, and the rest are claimed with one script
    (``start_jobs``), as race-safe as arq's own start. It also survives Redis going away for
    a while, where arq's worker would exit, and the end of a job outlasts a Redis restart or
    failover.

    With ``wake_ups`` it polls when told to instead of every ``poll_delay``: the worker's
    wake-up listener (workers/wakeup.py) calls ``jobs_queued`` when a job enters its queue and
    ``abort_requested`` when one of its jobs is to be aborted, and it polls again itself when
    a slot frees while jobs it could not take wait. ``poll_delay`` is then only the fallback,
    for wake-ups lost while the listener reconnects. Wake-ups that come during a poll give
    one more poll, however many they are."""

    def __init__(self, *args: Any, wake_ups: bool = False, end_writer: EndWriter | None = None,
                 claimed_by: str | None = None, busy_field: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._end_writer = end_writer
        # The worker id that keys.RUNNING names for each job from the moment it is claimed to
        # its end, so the API's sweep settles the jobs of a worker that died, even those it
        # had taken and not started yet (arq's marker would hold them for the job timeout).
        # Jobs routed to this worker (api/routing.py) are its alone for a while; others' are not.
        self.claimed_by = claimed_by
        # The field of keys.busy(claimed_by) that counts the jobs it runs: the model's name.
        self.busy_field = busy_field
        self._result_unkept: set[str] = set()  # filled by keep_no_result
        self.ctx[RESULT_UNKEPT] = self._result_unkept
        self.wake_ups = wake_ups
        self.fallback_poll_s = self.poll_delay_s
        if wake_ups:
            self.poll_delay_s = 0  # arq's loop does not pause; _poll_iteration waits to be woken
        self.polls = 0  # polls so far (to observe how often it looks)
        self._wake = asyncio.Event()
        self._wake.set()  # the first poll at once
        self._wake_timer: asyncio.Handle | None = None
        self._wake_at = 0.0  # loop time the pending poll is due
        self._between_polls = asyncio.Event()
        self._between_polls.set()
        # The last poll left jobs it had no slot for, or had no slot to look: a job that ends
        # polls again at once.
        self._jobs_left = False

    # ------------------------------------------------------------ being woken

    def jobs_queued(self, score_ms: int | None = None) -> None:
        """Jobs entered this consumer's queue, the last takeable from ``score_ms`` (cluster
        time). A job scored ahead of this process's clock (the clocks of two machines agree
        only to within a round trip) would be invisible to a poll now, so the poll waits for it."""
        if self.job_counter >= self.max_jobs:
            self._jobs_left = True  # no slot: the next job to end polls
            return
        # A job scored ahead of this clock is invisible to a poll until then (arq takes jobs
        # scored up to its clock's now).
        ahead_s = 0.0 if score_ms is None else max(0.0, (score_ms - clock.now_ms() + 1) / 1000)
        self._wake_in(min(max(ahead_s, self._turn_s()), self.fallback_poll_s))

    def _turn_s(self) -> float:
        """How long to let other workers look first. Every worker serving the queue hears of
        a job at the same moment, in the order they subscribed, and the first to look takes
        all it has room for: without a wait the same worker would take every job while others
        idle. Busier workers wait longer, and a random part of a millisecond breaks ties."""
        return random.uniform(0.0, TIE_BREAK_S) + BUSY_WAIT_S * self.job_counter / max(self.max_jobs, 1)

    def abort_requested(self, job_id: str) -> None:
        """An abort of ``job_id`` was asked for: poll now if this consumer has it."""
        if job_id in self.tasks:
            self._wake.set()

    def wake(self) -> None:
        """Poll now (the listener was away, and wake-ups may have been lost meanwhile)."""
        self._wake.set()

    async def between_polls(self) -> None:
        """Returns once no poll is under way (a poll that has begun may still start jobs)."""
        await self._between_polls.wait()

    def _wake_in(self, delay_s: float) -> None:
        """Poll in ``delay_s``, unless a poll is already due sooner."""
        if delay_s <= 0:
            self._wake.set()
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        # When the pending poll is due, kept here: uvloop turns a delay under half a
        # millisecond into a plain handle, which cannot say when it runs.
        if self._wake_timer is not None and now < self._wake_at <= now + delay_s:
            return
        if self._wake_timer is not None:
            self._wake_timer.cancel()  # fired already (harmless), or later than needed
        self._wake_at = now + delay_s
        self._wake_timer = loop.call_later(delay_s, self._wake.set)

    async def _until_woken(self) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), self.fallback_poll_s)
        except TimeoutError:
            pass
        # Cleared before the poll: a wake-up during it is for jobs it may not have seen.
        self._wake.clear()

    # ------------------------------------------------------------ arq's hooks

    async def _poll_iteration(self) -> None:
        if self.wake_ups:
            await self._until_woken()
        if self.allow_pick_jobs and self.job_counter >= self.max_jobs:
            self._jobs_left = True  # arq does not look while it has no slot
        self.polls += 1
        self._between_polls.clear()
        try:
            await super()._poll_iteration()
            return
        except (RedisError, OSError) as exc:
            # arq ends the worker on the first Redis error of its poll loop; a Redis restart
            # would then cost a model reload. Keep polling until Redis is back.
            log.warning("Redis unreachable (%s); retrying in 1 s", exc)
        finally:
            self._between_polls.set()
        await asyncio.sleep(1)

    def _release_sem_dec_counter_on_complete(self) -> None:
        # Called as each job's task ends: its slot is free.
        super()._release_sem_dec_counter_on_complete()
        if self._jobs_left:
            self._jobs_left = False
            self._wake.set()

    async def finish_job(self, job_id: str, finish: bool, result_data: bytes | None, result_timeout_s: float | None,
                         keep_result_forever: bool, *args: Any) -> None:
        # arq's end of a job (result, in-progress marker, queue entry), kept through a Redis
        # restart or failover: lost, the queue would count the job as running for an hour.
        if job_id in self._result_unkept:
            self._result_unkept.discard(job_id)
            result_data = None
        incr_score, keep_in_progress = args
        if self._end_writer is not None and finish and keep_in_progress is None:
            expire_ms = None if keep_result_forever else to_ms(result_timeout_s)
            await self._end_writer(self._ended(job_id, result_data, expire_ms))
            return
        await until_redis_answers(lambda: super(JobConsumer, self).finish_job(
            job_id, finish, result_data, result_timeout_s, keep_result_forever, *args), f"end of job {job_id}")
        await self._unclaimed(job_id)

    def _ended(self, job_id: str, result_data: bytes | None, expire_ms: int | None) -> Callable[[Any], None]:
        """arq's end of a finished job as commands for the worker's next batched round trip
        (workers/frames.py), shared with the other jobs ending now. arq sends them as one
        transaction; here the order keeps them safe instead: the job leaves its queue before
        its in-progress marker goes, so no claim in between can find it takeable."""
        def end(pipe: Any) -> None:
            if result_data:
                pipe.set(result_key_prefix + job_id, result_data, px=expire_ms)
            pipe.zrem(self.queue_name, job_id)
            pipe.zrem(abort_jobs_ss, job_id)
            pipe.delete(retry_key_prefix + job_id, job_key_prefix + job_id, in_progress_key(job_id))
            if self.claimed_by is not None:
                pipe.hdel(keys.RUNNING, job_id)
                if self.busy_field:
                    pipe.hincrby(keys.busy(self.claimed_by), self.busy_field, -1)

        return end

    async def _unclaimed(self, job_id: str) -> None:
        """The job ended here, or went back to its queue: no longer ours in keys.RUNNING, nor
        counted among the jobs this worker runs."""
        if self.claimed_by is None:
            return

        async def unclaim() -> None:
            async with self.pool.pipeline(transaction=False) as pipe:
                pipe.hdel(keys.RUNNING, job_id)
                if self.busy_field:
                    pipe.hincrby(keys.busy(self.claimed_by), self.busy_field, -1)
                await pipe.execute()

        await until_redis_answers(unclaim, f"end of job {job_id}")

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        # A job that failed before it ran (aborted as it was taken, expired): its function
        # never said whether to keep the result, so the payload tells (a rare path; one read).
        if result_data is not None:
            try:
                if _streamed(await self.pool.get(job_key_prefix + job_id)):
                    result_data = None
            except (RedisError, OSError):
                pass  # keep it then: a result too many, with its TTL, harms nothing
        await until_redis_answers(lambda: super(JobConsumer, self).finish_failed_job(job_id, result_data),
                                  f"end of job {job_id}")
        await self._unclaimed(job_id)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Start as many of ``job_ids`` as there are free slots, claimed in one round trip.

        arq claims each job with its own WATCH/MULTI transaction, four round trips one after
        another, then starts it with another transaction: under load (hundreds of jobs a
        second starting on one worker) that was the limit on how fast a worker could take
        work, and every job waited behind the others' round trips. The claim script does for
        all of them at once what arq's transactions do for one (skip a job another worker
        started, or one scored in the future; mark the rest in progress; read each, count its
        try, take its abort request), atomically, so two workers still never start the same job."""
        candidates = [j.decode() for j in job_ids if j.decode() not in self.tasks]
        free = self.max_jobs - self.job_counter
        if not candidates or free <= 0 or not self.allow_pick_jobs:
            if candidates and free <= 0:
                self._jobs_left = True  # the next job to end polls for them
            return
        claimer = self.claimed_by or ""
        *claimed, held_ms = await self.pool.eval(
            _CLAIM, 3, self.queue_name, keys.RUNNING, keys.busy(claimer), in_progress_key(""), clock.now_ms(),
            int(self.in_progress_timeout_s * 1000), free, claimer, keys.route(""), keys.routed(""), self.busy_field,
            job_key_prefix, retry_key_prefix, abort_jobs_ss if self.allow_abort_jobs else "", *candidates)
        if int(held_ms) >= 0:
            # Jobs routed to other workers were left; if still queued when their hold lapses,
            # they are anyone's (api/routing.py): look again then.
            self._wake_in(int(held_ms) / 1000 + TIE_BREAK_S)
        for i in range(0, len(claimed), _CLAIMED_FIELDS):
            job_id, score, payload, tries, aborted = claimed[i:i + _CLAIMED_FIELDS]
            job_id = job_id.decode() if isinstance(job_id, bytes) else job_id
            await self.sem.acquire()  # never waits: only free slots were claimed
            self.job_counter += 1
            # arq's run_job opens with its start transaction; the claim ran it already.
            started = [payload, tries, 1, aborted] if self.allow_abort_jobs else [payload, tries, 1]
            context = contextvars.copy_context()
            context.run(_CLAIMED_START.set, _ClaimedStart(started))
            task = self.loop.create_task(self.run_job(job_id, int(float(score))), context=context)
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task
        if len(claimed) // _CLAIMED_FIELDS == free and len(candidates) > free:
            self._jobs_left = True  # the next job to end polls for the others

    @property
    def pool(self) -> ArqRedis:
        # In a job's task, the first use of the pool is arq's start transaction (run_job's
        # first statement), which the claim ran already: it gets the claim's results instead
        # of a round trip per job, the worker's largest cost per job started.
        started = _CLAIMED_START.get()
        if started is None:
            return self._pool
        _CLAIMED_START.set(None)
        return started  # type: ignore[return-value]


# The claim's results of arq's start transaction, for the task of the job they are for.
_CLAIMED_START: contextvars.ContextVar[_ClaimedStart | None] = contextvars.ContextVar("claimed_start", default=None)


class _ClaimedStart:
    """Stands in for the pool in arq's ``run_job`` (arq 0.28, pinned), which opens with
    ``async with self.pool.pipeline(transaction=True)``: GET the job, INCR and EXPIRE its try
    counter, ZREM it from the abort set. The claim script did these already, atomically with
    the claim; this replays their results, and fails loudly should arq queue anything else."""

    _EXPECTED = ("get", "incr", "expire", "zrem")

    def __init__(self, results: list[Any]) -> None:
        self._results = results
        self._queued: list[str] = []

    def pipeline(self, transaction: bool = True) -> _ClaimedStart:
        return self

    async def __aenter__(self) -> _ClaimedStart:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, command: str) -> Callable[..., None]:
        if command not in self._EXPECTED:
            raise AttributeError(f"arq's start transaction queued {command!r}; the claim script does not run it")
        return lambda *args: self._queued.append(command)

    async def execute(self) -> list[Any]:
        if tuple(self._queued) != self._EXPECTED[:len(self._results)]:
            raise RuntimeError(f"arq's start transaction was {self._queued}, not what the claim script ran")
        return self._results


# KEYS: the queue zset, keys.RUNNING, keys.busy(claimer). ARGV: the in-progress key prefix,
# now (ms), the in-progress marker's TTL (ms), how many to claim at most, the claiming worker's
# id ("" to record none), the route hold key prefix, the routed zset prefix, the busy field,
# arq's job and retry key prefixes, arq's abort zset ("" if aborts are not watched), then the
# candidate job ids in queue order.
# A job held for another worker (keys.route names it) is left; one held for this worker, or
# no longer held, is claimed, and its hold removed. A claimed job is also started as arq's
# run_job starts it: its payload read, its try counted, its abort request (if any) taken.
# Returns id, score, payload, try, aborted (0/1) for each job claimed (marked in progress) for
# this worker, then the ms until the first hold on a job left lapses (-1: none left).
_CLAIMED_FIELDS = 5
_CLAIM = """
local claimed = {}
local room = tonumber(ARGV[4])
local claimer = ARGV[5]
local soonest = -1
for i = 12, #ARGV do
  if room == 0 then break end
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  local marker = ARGV[1] .. id
  if score and tonumber(score) <= tonumber(ARGV[2]) and redis.call('EXISTS', marker) == 0 then
    local hold = ARGV[6] .. id
    local holder = redis.call('GET', hold)
    if holder and holder ~= claimer then
      local left = redis.call('PTTL', hold)
      if left >= 0 and (soonest < 0 or left < soonest) then soonest = left end
    else
      if holder then
        redis.call('DEL', hold)
        redis.call('ZREM', ARGV[7] .. holder, id)
      end
      redis.call('PSETEX', marker, ARGV[3], '1')
      if claimer ~= '' then redis.call('HSET', KEYS[2], id, claimer) end
      local retry = ARGV[10] .. id
      local tries = redis.call('INCR', retry)
      redis.call('EXPIRE', retry, 88400)
      local aborted = 0
      if ARGV[11] ~= '' then aborted = redis.call('ZREM', ARGV[11], id) end
      claimed[#claimed + 1] = id
      claimed[#claimed + 1] = score
      claimed[#claimed + 1] = redis.call('GET', ARGV[9] .. id)
      claimed[#claimed + 1] = tries
      claimed[#claimed + 1] = aborted
      room = room - 1
    end
  end
end
if claimer ~= '' and ARGV[8] ~= '' and #claimed > 0 then
  redis.call('HINCRBY', KEYS[3], ARGV[8], #claimed / 5)
end
claimed[#claimed + 1] = soonest
return claimed
"""
