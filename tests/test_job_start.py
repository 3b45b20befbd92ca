"""A job is started by the claim script (common/job_consumer.py): its payload read, its try
counted and its abort request taken in the same script that claims it, where arq's run_job
opens with a transaction of its own per job. What arq did at that start must still happen."""

from __future__ import annotations

import asyncio

import pytest
from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, job_key_prefix, retry_key_prefix
from arq.jobs import Job, JobStatus

from common import clock
from common.job_consumer import JobConsumer, _ClaimedStart, job_function
from common.redis_conn import connect, job_deserializer, job_serializer
from tests.harness import async_wait_until

QUEUE = "test:job-start"


@pytest.fixture
async def pool(redis_server):
    redis = await connect(redis_server.url)
    await redis.flushdb()
    yield redis
    await redis.flushdb()
    await redis.aclose()


def consumer(pool: ArqRedis, runs: list) -> JobConsumer:
    async def echo(ctx: dict, text: str) -> str:
        runs.append((ctx["job_id"], ctx["job_try"], text))
        return text.upper()

    return JobConsumer(functions=[job_function(echo, name="echo", max_tries=2)], queue_name=QUEUE, redis_pool=pool,
                       poll_delay=0.05, allow_abort_jobs=True, handle_signals=False, keep_result=60,
                       job_serializer=job_serializer, job_deserializer=job_deserializer)


async def run_until(worker: JobConsumer, done, what: str) -> None:
    task = asyncio.create_task(worker.main())
    try:
        await async_wait_until(done, 10, what)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()


async def test_jobs_run_with_their_arguments_and_first_try(pool):
    runs: list = []
    jobs = [await pool.enqueue_job("echo", _queue_name=QUEUE, text=f"job {i}") for i in range(20)]
    await run_until(consumer(pool, runs), lambda: _true(len(runs) == 20), "every job to run")
    assert sorted(text for _, _, text in runs) == sorted(f"job {i}" for i in range(20))
    assert {job_try for _, job_try, _ in runs} == {1}
    for i, job in enumerate(jobs):
        assert await job.result(timeout=5) == f"JOB {i}"
        assert await pool.exists(retry_key_prefix + job.job_id) == 0  # arq's end removes the counter


async def test_a_job_aborted_before_it_starts_never_runs(pool):
    runs: list = []
    kept = await pool.enqueue_job("echo", _queue_name=QUEUE, text="kept")
    aborted = await pool.enqueue_job("echo", _queue_name=QUEUE, text="aborted")
    await pool.zadd(abort_jobs_ss, {aborted.job_id: clock.now_ms()})
    await run_until(consumer(pool, runs), lambda: _status_is(aborted, JobStatus.complete), "the abort to settle")
    assert [text for _, _, text in runs] == ["kept"]
    info = await aborted.result_info()
    assert not info.success and info.result["error_type"] == "CancelledError"
    assert await kept.result(timeout=5) == "KEPT"
    assert await pool.zscore(abort_jobs_ss, aborted.job_id) is None  # the abort request was taken


async def test_a_job_whose_payload_is_gone_fails_as_expired(pool):
    runs: list = []
    job = await pool.enqueue_job("echo", _queue_name=QUEUE, text="gone")
    await pool.delete(job_key_prefix + job.job_id)
    worker = consumer(pool, runs)
    await run_until(worker, lambda: _true(worker.jobs_failed == 1), "the job to fail")
    assert runs == []


async def test_a_job_on_its_second_try_is_told_so(pool):
    runs: list = []
    job = await pool.enqueue_job("echo", _queue_name=QUEUE, text="again")
    await pool.set(retry_key_prefix + job.job_id, 1)  # one try before this one (a worker died)
    await run_until(consumer(pool, runs), lambda: _true(len(runs) == 1), "the job to run")
    assert runs[0][1] == 2


async def test_the_stand_in_refuses_a_start_the_claim_did_not_run():
    start = _ClaimedStart([b"payload", 1, 1, 0])
    async with start.pipeline(transaction=True) as pipe:
        pipe.get("k")
        pipe.incr("r")
        pipe.expire("r", 88400)
        pipe.zrem("a", "id")
        assert await pipe.execute() == [b"payload", 1, 1, 0]
    with pytest.raises(AttributeError):
        _ClaimedStart([b"payload", 1, 1]).hset("k", "f", "v")
    shorter = _ClaimedStart([b"payload", 1, 1, 0])
    shorter.get("k")
    with pytest.raises(RuntimeError):
        await shorter.execute()


async def _true(value: bool) -> bool:
    return value


async def _status_is(job: Job, status: JobStatus) -> bool:
    return await job.status() == status
