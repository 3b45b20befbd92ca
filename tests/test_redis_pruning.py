"""Each key without a TTL of its own has a pruning rule, and each rule works: catalogs expire
a day after their store's last heartbeat, arq's abort set and the shared indexes lose stale
members in the API's housekeeping, and a streamed job leaves no result and only a short-lived
record. Real Redis; the housekeeping runs for real, in its loop, under its lock.

The whole-stack figure (memory back where it was after 10,000 requests) is in
tests/test_redis_memory.py."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from arq.constants import abort_jobs_ss

from api.housekeeping import Housekeeping
from common import catalog, clock, keys, registry
from common.job_queue import ABORT_KEEP_S, JobQueue
from common.model_info import ModelDescription, ModelDetails
from common.redis_conn import connect
from common.settings import Settings
from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until
from workers.fake_engine import FakeEngine

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _manifest(name: str) -> catalog.Manifest:
    description = ModelDescription(
        details=ModelDetails(format="safetensors", family="llama", families=["llama"], parameter_size="1M",
                             quantization_level="F32"),
        parameter_count=1, size_bytes=1, context_length=8, embedding_length=8, architecture="llama",
        model_info={}, template="", parameters="", capabilities=["completion"], license="")
    return catalog.Manifest(name=name, path=name, files=[], size=1, digest="0" * 64, modified_at=0.0,
                            description=description)


def _store(store_id: str) -> catalog.StoreInfo:
    return catalog.StoreInfo(store_id=store_id, host="h", pid=1, root="/tmp/x", free_bytes=1)


async def _fresh_redis(url: str):
    redis = await connect(url)
    await redis.flushdb()
    return redis


async def test_a_catalog_expires_a_day_after_its_store_and_each_heartbeat_renews_it(redis_server):
    redis = await _fresh_redis(redis_server.url)
    try:
        key = keys.catalog("s1")
        await catalog.reset(redis, "s1", [_manifest("m:1")])
        assert 0 < await redis.ttl(key) <= catalog.CATALOG_TTL_S  # written with its TTL
        await catalog.put(redis, "s1", _manifest("m:2"))
        assert 0 < await redis.ttl(key) <= catalog.CATALOG_TTL_S

        # A live store's heartbeat sets the full day again.
        await redis.expire(key, 100)
        await catalog.publish_store(redis, _store("s1"), ttl_s=5)
        assert await redis.ttl(key) > catalog.CATALOG_TTL_S - 60

        # A store that stops beating: its catalog goes when the TTL runs out (here made short).
        await redis.pexpire(key, 300)
        await asyncio.sleep(0.6)
        assert not await redis.exists(key)
    finally:
        await redis.aclose()


async def _run_housekeeping(redis, settings: Settings, done, what: str, timeout_s: float = 15) -> None:
    housekeeping = Housekeeping(redis, JobQueue(redis, settings.keep_result_s), settings)
    await housekeeping.start()
    try:
        await async_wait_until(done, timeout_s, what, interval_s=0.1)
    finally:
        await housekeeping.stop()


async def test_housekeeping_prunes_abort_requests_no_worker_took(redis_server):
    redis = await _fresh_redis(redis_server.url)
    settings = Settings(redis_url=redis_server.url, heartbeat_ttl_s=2.0)  # a round a second
    try:
        now_ms = int(clock.now() * 1000)
        await redis.zadd(abort_jobs_ss, {"ended-long-ago": now_ms - (ABORT_KEEP_S + 5) * 1000,
                                         "just-asked": now_ms})

        async def pruned() -> bool:
            return await redis.zscore(abort_jobs_ss, "ended-long-ago") is None

        await _run_housekeeping(redis, settings, pruned, "the old abort request to be pruned")
        assert await redis.zscore(abort_jobs_ss, "just-asked") is not None  # a fresh one stays
    finally:
        await redis.aclose()


async def test_housekeeping_prunes_index_members_whose_record_expired(redis_server):
    redis = await _fresh_redis(redis_server.url)
    settings = Settings(redis_url=redis_server.url, heartbeat_ttl_s=2.0, load_timeout_s=30)
    try:
        now_ms = int(clock.now() * 1000)
        old_ms = now_ms - 60_000
        await redis.zadd(keys.WORKERS, {"dead-worker": old_ms, "live-worker": now_ms})
        live = registry.WorkerInfo(worker_id="live-worker", host="h", pid=1, models=[], state="ready",
                                   started_at=0, heartbeat_at=0)
        await redis.set(keys.worker_record("live-worker"), live.model_dump_json(), ex=60)
        await redis.zadd(keys.STORES, {"dead-store": old_ms, "live-store": now_ms})
        await redis.set(keys.store_record("live-store"), _store("live-store").model_dump_json(), ex=60)
        # Load requests: one nobody waits for any more, one a queued job still waits for, a new one.
        await redis.zadd(keys.LOADS, {"abandoned:1": old_ms, "awaited:1": old_ms, "new:1": now_ms})
        await redis.zadd(keys.batch_queue("awaited:1"), {"job-1": old_ms})
        # Async jobs listed past their records' TTL, and one within it.
        await redis.zadd(keys.JOBS, {"old-job": now_ms - (settings.keep_result_s + 10) * 1000, "new-job": now_ms})

        async def pruned() -> bool:
            return (await redis.zscore(keys.WORKERS, "dead-worker") is None
                    and await redis.zscore(keys.STORES, "dead-store") is None
                    and await redis.zscore(keys.LOADS, "abandoned:1") is None
                    and await redis.zscore(keys.JOBS, "old-job") is None)

        await _run_housekeeping(redis, settings, pruned, "the stale index members to be pruned")
        assert await redis.zrange(keys.WORKERS, 0, -1) == [b"live-worker"]
        assert await redis.zrange(keys.STORES, 0, -1) == [b"live-store"]
        assert sorted(await redis.zrange(keys.LOADS, 0, -1)) == [b"awaited:1", b"new:1"]
        assert await redis.zrange(keys.JOBS, 0, -1) == [b"new-job"]
    finally:
        await redis.aclose()


async def test_a_streamed_job_keeps_no_result_and_its_record_a_minute_an_async_job_both(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200
        [record_key] = [k async for k in stack.redis.scan_iter(keys.job_record("*"))]
        job_id = record_key.decode().rsplit(":", 1)[1]
        assert json.loads(await stack.redis.get(record_key))["status"] == "done"
        assert 0 < await stack.redis.ttl(record_key) <= 60
        assert [k async for k in stack.redis.scan_iter("arq:*" + job_id)] == []

        job = (await http.post("/api/jobs/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
                               )).json()
        await async_wait_until(lambda: stack.redis.exists(f"arq:result:{job['id']}"), 10, "the async job's result")
        keep = stack.settings.keep_result_s
        assert keep - 60 < await stack.redis.ttl(f"arq:result:{job['id']}") <= keep
        assert keep - 60 < await stack.redis.ttl(keys.job_record(job["id"])) <= keep


async def test_a_stream_left_while_queued_is_withdrawn_and_leaves_nothing_for_arq(redis_server):
    # One slot, taken by a long answer: the second request waits in the queue, and its client leaves.
    engine = FakeEngine(answer_tokens=10_000, step_s=0.01)
    async with fake_stack(redis_server.url, engine=engine, max_jobs=1) as stack, stack.client() as http:
        async with http.stream("POST", "/api/generate", json={"model": MODEL, "prompt": "long"}) as first:
            lines = first.aiter_lines()
            await anext(lines)
            with pytest.raises(Exception):
                await http.post("/api/generate", timeout=0.5, json={"model": MODEL, "prompt": "waits"})
            queue = keys.generation_queue(MODEL)
            await async_wait_until(lambda: _count(stack.redis.zcard(queue), 1), 5, "the waiting job withdrawn")
        await async_wait_until(lambda: _count(stack.redis.zcard(keys.generation_queue(MODEL)), 0), 5,
                               "the first job to end")
        started = time.monotonic()
        while time.monotonic() - started < 0.5:  # the worker must not start the withdrawn job
            await asyncio.sleep(0.1)
        assert len(engine.started) == 1
        left = sorted([k.decode() async for k in stack.redis.scan_iter("arq:*") if b"health-check" not in k])
        assert left == [], left
        assert await stack.redis.zcard(abort_jobs_ss) == 0  # nothing to abort: it never started


async def _count(awaitable, expected: int) -> bool:
    return await awaitable == expected
