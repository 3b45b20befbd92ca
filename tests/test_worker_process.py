"""Worker processes as operators run them (`vllama worker`), with the fake engine: what
happens when one is killed, and that two workers share one model's queue."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from api.batches import _lost_already
from common import keys, registry
from common.job_consumer import JobConsumer
from common.job_queue import JOB_LOST_MESSAGE, JobQueue, job_function
from common.protocol import GenerationJob, Sampling
from tests.fake_stack import MODEL, fake_stack
from tests.harness import Proc, async_wait_until

pytestmark = pytest.mark.asyncio(loop_scope="session")


def start_fake_worker(redis_url: str, tmp_path, name: str) -> Proc:
    # Two jobs at most each, so a burst must spread over workers whatever the poll timing.
    env = {"VLLAMA_REDIS_URL": redis_url, "VLLAMA_MODEL": MODEL, "VLLAMA_ENGINE": "fake", "VLLAMA_MAX_JOBS": "2"}
    return Proc(["worker"], env, tmp_path / f"{name}.log")


async def _ready_workers(stack, n: int):
    async def enough():
        live = await registry.live_workers(stack.redis)
        ready = [w for w in live if w.state == "ready"]
        return ready if len(ready) >= n else None

    return await async_wait_until(enough, 30, f"{n} ready workers")


async def test_killed_worker_ends_its_streams_with_an_error_within_seconds(redis_server, tmp_path):
    async with fake_stack(redis_server.url, worker=False) as stack:
        victim = start_fake_worker(redis_server.url, tmp_path, "victim")
        try:
            [info] = await _ready_workers(stack, 1)
            async with stack.client() as http, http.stream(
                "POST", "/api/generate",
                json={"model": MODEL, "prompt": "x", "options": {"num_predict": 5000}},
            ) as r:
                lines = r.aiter_lines()
                assert "response" in json.loads(await anext(lines))
                victim.kill()
                killed_at = time.monotonic()
                last = None
                async for line in lines:
                    last = json.loads(line)
                waited = time.monotonic() - killed_at
            assert last is not None and "error" in last, last
            assert "stopped responding" in last["error"]
            assert waited < 10, f"the error took {waited:.1f}s"
            [record_key] = [k async for k in stack.redis.scan_iter(keys.job_record("*"))]
            record = json.loads(await stack.redis.get(record_key))
            assert record["status"] == "failed" and record["worker_id"] == info.worker_id
            # Nothing of the lost job is left for arq to pick up again later.
            assert await stack.redis.zcard(keys.generation_queue(MODEL)) == 0
            assert not await stack.redis.exists(f"arq:job:{record['job_id']}", f"arq:in-progress:{record['job_id']}")
        finally:
            victim.stop()


async def test_two_workers_take_jobs_from_the_same_queue(redis_server, tmp_path):
    async with fake_stack(redis_server.url, worker=False) as stack:
        workers = [start_fake_worker(redis_server.url, tmp_path, f"w{i}") for i in range(2)]
        try:
            await _ready_workers(stack, 2)
            async with stack.client() as http:
                async def one():
                    r = await http.post("/api/generate", json={
                        "model": MODEL, "prompt": "x", "stream": False, "options": {"num_predict": 20}})
                    assert r.status_code == 200
                    return r

                # Six at once with two slots per worker: the second worker must take some.
                await asyncio.gather(*(one() for _ in range(6)))
            served_by = set()
            async for key in stack.redis.scan_iter(keys.job_record("*")):
                served_by.add(json.loads(await stack.redis.get(key))["worker_id"])
            assert len(served_by) == 2
        finally:
            for w in workers:
                w.stop()


async def test_jobs_a_dead_worker_took_but_never_started_are_failed_not_stranded(redis_server):
    """A worker claims every job it has room for at once, then starts them one by one: one
    that dies in between leaves jobs marked in progress that nobody runs. The claim names the
    worker in vllama:running, so the sweep fails them as lost (instead of arq keeping every
    other worker off them until the job timeout), and leaves a live worker's claims alone."""
    async with fake_stack(redis_server.url, worker=False) as stack:
        queue = JobQueue(stack.redis, keep_result_s=60)
        jobs = [GenerationJob(job_id=f"claimed-{n}", model=MODEL, kind="generate", prompt="hi", stream=False,
                              sampling=Sampling(max_tokens=3)) for n in range(3)]
        for job in jobs:
            await queue.enqueue(job, limit=100)

        async def never_reached(ctx, spec):
            raise AssertionError("the claimed jobs must not start in this test")

        def consumer(worker_id: str, max_jobs: int) -> JobConsumer:
            return JobConsumer(functions=[job_function(never_reached, name="generate")],
                               queue_name=keys.generation_queue(MODEL), redis_pool=stack.redis, max_jobs=max_jobs,
                               claimed_by=worker_id, handle_signals=False)

        live, dead = consumer("live-worker", 1), consumer("dead-worker", 2)
        await stack.redis.set(keys.worker_record("live-worker"), "{}", ex=60)  # its heartbeat
        for taker in (live, dead):
            await taker.start_jobs([job.job_id.encode() for job in jobs])
            for task in taker.tasks.values():
                task.cancel()  # dies before its first step: claimed, never started
        taken = {k.decode(): v.decode() for k, v in (await stack.redis.hgetall(keys.RUNNING)).items()}
        assert taken == {"claimed-0": "live-worker", "claimed-1": "dead-worker", "claimed-2": "dead-worker"}

        assert await queue.sweep_lost() == 2
        for job in jobs[1:]:
            record = await queue.record(job.job_id)
            assert record.status == "failed" and record.error == JOB_LOST_MESSAGE
            assert await queue.whereabouts(job.job_id) == "gone"
            assert _lost_already(record) is record  # a batch line of it is settled as lost, not awaited forever
        assert (await queue.record("claimed-0")).status == "queued"
        assert await queue.whereabouts("claimed-0") == "running"
        assert await stack.redis.hgetall(keys.RUNNING) == {b"claimed-0": b"live-worker"}
