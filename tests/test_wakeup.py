"""Workers take a job the moment it is queued and honour an abort the moment it is asked
for, woken over pub/sub, and fall back to slow polling when wake-ups are lost.

Every test here sets VLLAMA_POLL_DELAY_S (the fallback poll) far beyond its deadline, so a
job that starts in time was woken, not polled for; over real Redis and HTTP with the fake
engine."""

from __future__ import annotations

import asyncio
import time

from common import keys
from common.job_consumer import JobConsumer
from common.job_queue import JobQueue
from common.protocol import GenerationJob, Sampling
from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until
from workers.fake_engine import FakeEngine

NEVER_S = 30.0  # a fallback poll that no test waits for


async def generate(http, num_predict: int = 2) -> str:
    r = await http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False,
                                               "options": {"num_predict": num_predict}}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["response"]


async def wait_status(http, job_id: str, status: str, timeout_s: float) -> None:
    async def reached() -> bool:
        return (await http.get(f"/api/jobs/{job_id}")).json().get("status") == status

    await async_wait_until(reached, timeout_s, f"job {job_id} to be {status}")


def consumers(stack) -> list[JobConsumer]:
    return stack.worker.models[MODEL].consumers


async def settled(stack) -> None:
    """The consumers' first polls are over: from now on they poll only when woken."""
    await asyncio.sleep(0.3)
    for consumer in consumers(stack):
        await consumer.between_polls()


async def subscribed(stack) -> bool:
    return bool(stack.worker._wakeups.subscribed)


async def test_a_job_queued_for_an_idle_worker_starts_at_once_and_an_idle_worker_does_not_poll(redis_server):
    async with fake_stack(redis_server.url, poll_delay_s=NEVER_S) as stack, stack.client() as http:
        await async_wait_until(lambda: subscribed(stack), 5, "the wake-up subscription")
        await settled(stack)
        polls = [c.polls for c in consumers(stack)]
        await asyncio.sleep(1)
        assert [c.polls for c in consumers(stack)] == polls  # idle: no polling at all

        started = time.monotonic()
        assert await generate(http) == "tok0 tok1 "
        # An async job goes to the batch queue, woken the same way.
        job = (await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": "hi",
                                                            "options": {"num_predict": 2}})).json()
        assert job["priority"] == "batch"
        await wait_status(http, job["id"], "done", timeout_s=10)
        print(f"\ntwo jobs with the fallback poll at {NEVER_S:.0f} s: done in {time.monotonic() - started:.2f} s")


async def test_an_abort_reaches_a_running_job_at_once(redis_server):
    engine = FakeEngine(answer_tokens=10**6, step_s=0.02)
    async with fake_stack(redis_server.url, engine=engine, poll_delay_s=NEVER_S) as stack, stack.client() as http:
        await async_wait_until(lambda: subscribed(stack), 5, "the wake-up subscription")
        job = (await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": "hi",
                                                            "options": {"num_predict": 10**6}})).json()
        await wait_status(http, job["id"], "running", timeout_s=10)
        await settled(stack)
        # An async job has no listener to lose: only the abort can stop it.
        assert (await http.delete(f"/api/jobs/{job['id']}")).status_code in (200, 202, 204)
        await async_wait_until(lambda: _aborted(engine, job["id"]), 5, "the engine request aborted")
        await wait_status(http, job["id"], "cancelled", timeout_s=5)


async def _aborted(engine: FakeEngine, job_id: str) -> bool:
    return any(job_id in request_id for request_id in engine.aborted)


async def test_many_jobs_at_once_all_start_also_beyond_the_workers_slots(redis_server):
    """40 requests for a worker that runs 4 at a time: each that ends frees a slot that the
    next waiting job takes at once (no wake-up is sent then: the queue did not change)."""
    async with fake_stack(redis_server.url, engine=FakeEngine(step_s=0.01), poll_delay_s=NEVER_S,
                          max_jobs=4) as stack, stack.client() as http:
        await async_wait_until(lambda: subscribed(stack), 5, "the wake-up subscription")
        await settled(stack)
        started = time.monotonic()
        answers = await asyncio.wait_for(asyncio.gather(*(generate(http, 3) for _ in range(40))), 25)
        assert answers == ["tok0 tok1 tok2 "] * 40
        print(f"\n40 jobs through 4 slots: {time.monotonic() - started:.2f} s")


async def test_jobs_left_by_a_full_worker_start_as_its_slots_free(redis_server):
    """12 jobs queued in one round trip (one wake-up) for a worker that runs 4 at a time: the
    poll takes 4 and sees 8 left, so each job that ends polls again."""
    async with fake_stack(redis_server.url, engine=FakeEngine(step_s=0.01), poll_delay_s=NEVER_S,
                          max_jobs=4) as stack:
        await async_wait_until(lambda: subscribed(stack), 5, "the wake-up subscription")
        await settled(stack)
        queue = JobQueue(stack.redis, keep_result_s=60)
        jobs = [GenerationJob(job_id=f"left-{n}", model=MODEL, kind="generate", prompt="hi", stream=False,
                              sampling=Sampling(max_tokens=3)) for n in range(12)]
        assert await queue.enqueue_many([queue.prepare(job, limit=100) for job in jobs]) == [None] * 12
        for job in jobs:
            await async_wait_until(lambda: _status(queue, job.job_id, "done"), 10, f"{job.job_id} done")


async def test_wakeups_coalesce_into_one_more_poll(redis_server):
    async with fake_stack(redis_server.url, poll_delay_s=NEVER_S) as stack:
        await settled(stack)
        consumer = consumers(stack)[0]
        before = consumer.polls
        for _ in range(100):  # all before the consumer gets to run
            consumer.jobs_queued(None)
        await asyncio.sleep(0.5)
        assert consumer.polls == before + 1


async def test_a_job_queued_while_the_wakeup_connection_is_down_still_starts(redis_server):
    async with fake_stack(redis_server.url, poll_delay_s=0.5) as stack, stack.client() as http:
        await stack.worker._wakeups.stop()

        async def unsubscribed() -> bool:  # Redis drops a closed connection's subscription as it notices
            return await stack.redis.pubsub_numsub(keys.WAKEUP) == [(keys.WAKEUP.encode(), 0)]

        await async_wait_until(unsubscribed, 10, "the wake-up subscription to be gone")
        assert await generate(http) == "tok0 tok1 "


async def test_the_subscription_comes_back_after_its_connection_is_killed(redis_server):
    async with fake_stack(redis_server.url, poll_delay_s=NEVER_S) as stack, stack.client() as http:
        await async_wait_until(lambda: subscribed(stack), 5, "the wake-up subscription")
        await stack.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await async_wait_until(lambda: _numsub(stack.redis), 10, "the wake-up subscription back")
        await async_wait_until(lambda: subscribed(stack), 5, "the listener to see it")
        await settled(stack)
        assert await generate(http) == "tok0 tok1 "


async def test_the_subscription_comes_back_after_a_redis_restart(tmp_path):
    from cli.embedded_redis import EmbeddedRedis

    own = EmbeddedRedis(data_dir=tmp_path / "redis").start()
    try:
        async with fake_stack(own.url, poll_delay_s=NEVER_S) as stack, stack.client() as http:
            await async_wait_until(lambda: subscribed(stack), 5, "the wake-up subscription")
            own.stop()
            await async_wait_until(lambda: _unsubscribed(stack), 10, "the listener to notice")
            own.start()
            await async_wait_until(lambda: subscribed(stack), 20, "the wake-up subscription back")

            async def served() -> bool:  # the API's own connections come back too
                try:
                    return await generate(http) == "tok0 tok1 "
                except (AssertionError, OSError):
                    return False

            await async_wait_until(served, 20, "a job served after the restart")
            await settled(stack)
            assert await generate(http) == "tok0 tok1 "
    finally:
        own.stop()


async def test_a_job_scored_ahead_of_the_workers_clock_starts_when_due(redis_server):
    """Two machines' cluster clocks agree only to within a round trip: a job stamped a little
    in the future of the worker's clock is taken once due, not at the fallback poll."""
    async with fake_stack(redis_server.url, poll_delay_s=NEVER_S) as stack:
        await async_wait_until(lambda: subscribed(stack), 5, "the wake-up subscription")
        await settled(stack)
        queue = JobQueue(stack.redis, keep_result_s=60)
        for n in range(2):  # the second after the first one's wait for its job is over
            job = GenerationJob(job_id=f"ahead-{n}", model=MODEL, kind="generate", prompt="hi", stream=False,
                                sampling=Sampling(max_tokens=1))
            job_id, args = queue.prepare(job, limit=100)
            args = list(args)
            args[10] += 200  # the score: 0.2 s ahead
            await stack.redis.eval(*args)
            await async_wait_until(lambda: _status(queue, job_id, "done"), 5, f"job {n} done")


async def _status(queue: JobQueue, job_id: str, status: str) -> bool:
    record = await queue.record(job_id)
    return record is not None and record.status == status


async def _numsub(redis) -> bool:
    return (await redis.pubsub_numsub(keys.WAKEUP))[0][1] == 1


async def _unsubscribed(stack) -> bool:
    return not stack.worker._wakeups.subscribed


async def test_a_store_job_wakes_the_pull_worker(redis_server, tmp_path):
    """Pulls, copies and deletes go to a store's pull worker, which is woken for them too:
    an idle store costs no polling, and a delete asked for is done at once."""
    async with fake_stack(redis_server.url, worker=False, pull_worker=True, home=tmp_path,
                          poll_delay_s=NEVER_S) as stack:
        store_id = stack.pull_worker.store_id
        queue = JobQueue(stack.redis, keep_result_s=60)
        await asyncio.sleep(0.5)  # its first poll is over: from now on it looks only when woken
        job_id = await queue.enqueue_store_job(store_id, "delete", "nothing-here:latest")

        async def ended():
            return await queue.store_job_result(store_id, job_id)

        # Within a third of the fallback poll's delay: woken, not found by that poll.
        result = await async_wait_until(ended, NEVER_S / 3, "the delete to end")
        assert result.success and result.result == {"deleted": False, "leftovers": 0}
