"""Routing (api/routing.py): jobs spread over the workers serving a model by load, prompts
that share a long prefix go where it ran before, and a route never strands a job. Several
workers with fake engines in this process, one API, real Redis; the fake engine counts
prefix-cache hits as vLLM does (a prompt's whole blocks that an earlier prompt had)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from contextlib import asynccontextmanager

import pytest

from common import keys, registry
from common.prefixes import BLOCK_CHARS, prefix_hashes
from common.protocol import ChatMessage, GenerationJob
from common.redis_conn import connect
from common.registry import ModelStatus, WorkerInfo
from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until
from workers.fake_engine import FakeEngine
from workers.main import GenerationWorker

SYSTEM = "You are a careful assistant. " * 80  # about 2,300 characters shared by every chat below


class Workers:
    """Workers serving MODEL in this process, each with its own fake engine, started as a
    test needs them."""

    def __init__(self, stack, redis_url: str) -> None:
        self.stack, self.redis_url = stack, redis_url
        self.engines: dict[str, FakeEngine] = {}  # worker id -> its engine
        self._running: list[tuple[GenerationWorker, asyncio.Task]] = []

    async def add(self, engine: FakeEngine) -> str:
        worker = GenerationWorker(self.stack.settings, engine=engine,
                                  engine_factory=lambda name, path: FakeEngine())
        self._running.append((worker, asyncio.create_task(worker.run(redis=await connect(self.redis_url)))))
        self.engines[worker.worker_id] = engine

        async def ready() -> bool:
            live = {w.worker_id: w for w in await registry.live_workers(self.stack.redis)}
            status = live[worker.worker_id].status_of(MODEL) if worker.worker_id in live else None
            return status is not None and status.state == "ready"

        await async_wait_until(ready, 20, f"worker {worker.worker_id} to be ready")
        async with self.stack.client() as http:
            await http.get("/api/ps")  # the API's view of the workers, refreshed now
        return worker.worker_id

    async def stop(self) -> None:
        for worker, _ in self._running:
            worker.stop()
        await asyncio.gather(*(task for _, task in self._running), return_exceptions=True)


@asynccontextmanager
async def workers_stack(redis_server, count: int, *, step_s: float = 0.02, answer_tokens: int = 20, **settings):
    """An API and ``count`` workers serving MODEL, each with its own fake engine."""
    settings = {"max_jobs": 100, "batch_share": 1.0, **settings}
    async with fake_stack(redis_server.url, worker=False, **settings) as stack:
        workers = Workers(stack, redis_server.url)
        try:
            for _ in range(count):
                await workers.add(FakeEngine(step_s=step_s, answer_tokens=answer_tokens, max_model_len=8192))
            yield stack, workers.engines
        finally:
            await workers.stop()


async def submit(http, n: int, prompt=lambda i: f"job {i}", path: str = "/api/jobs/generate", **extra) -> list[str]:
    """``n`` async jobs at once; their ids."""
    async def one(i: int) -> str:
        body = {"model": MODEL, "prompt": prompt(i)} if path.endswith("generate") else \
            {"model": MODEL, "messages": prompt(i)}
        body.update(extra)
        r = await http.post(path, json=body)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def records(stack, ids: list[str]) -> list[dict]:
    raw = await stack.redis.mget([keys.job_record(i) for i in ids])
    return [json.loads(r) for r in raw]


async def all_done(stack, ids: list[str], within: float = 30) -> list[dict]:
    async def done() -> bool:
        return all(r["status"] == "done" for r in await records(stack, ids))

    await async_wait_until(done, within, f"{len(ids)} jobs to be done")
    return await records(stack, ids)


@pytest.mark.parametrize(("workers", "burst"), [(2, 12), (2, 48), (3, 12), (3, 48), (3, 200)])
async def test_a_burst_spreads_over_the_workers_by_load(redis_server, workers, burst):
    # Jobs of 5 s: the whole burst is in flight at once, however slowly a busy machine submits it.
    async with workers_stack(redis_server, workers, step_s=0.05, answer_tokens=100) as (stack, engines), \
            stack.client() as http:
        ids = await submit(http, burst)
        done = await all_done(stack, ids)
        ran = Counter(r["worker_id"] for r in done)
        assert set(ran) == set(engines), ran
        assert max(ran.values()) <= 1.5 * min(ran.values()), ran
        assert all(r["route"]["reason"] == "balance" and r["route"]["worker_id"] == r["worker_id"] for r in done)
        # Each engine ran the jobs its worker says it did.
        assert {w: len(e.started) for w, e in engines.items()} == dict(ran)


async def test_a_slower_worker_gets_fewer_jobs_and_a_joining_worker_takes_its_share(redis_server):
    async with fake_stack(redis_server.url, worker=False, max_jobs=100, batch_share=1.0) as stack, \
            stack.client() as http:
        workers = Workers(stack, redis_server.url)
        try:
            fast = await workers.add(FakeEngine(step_s=0.01, answer_tokens=20))  # 0.2 s a job
            slow = await workers.add(FakeEngine(step_s=0.05, answer_tokens=20))  # 1 s a job
            ids = []
            for _ in range(40):  # a steady stream: balance sends each job where fewer are running
                ids += await submit(http, 1)
                await asyncio.sleep(0.05)
            ran = Counter(r["worker_id"] for r in await all_done(stack, ids))
            # Equal running counts mean five times the jobs on the worker five times as fast.
            assert ran[fast] >= 2 * ran[slow], ran

            joined = await workers.add(FakeEngine(step_s=0.05, answer_tokens=100))
            ids = await submit(http, 12, options={"num_predict": 100})
            ran = Counter(r["worker_id"] for r in await all_done(stack, ids))
            assert ran[joined] >= 3, ran  # the empty newcomer takes its part of the burst
            assert sum(ran.values()) == 12
        finally:
            await workers.stop()


def chat(user: str, history: tuple = ()) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, *history, {"role": "user", "content": user}]


async def test_prompts_sharing_a_long_prefix_go_where_it_ran_and_hit_its_cache(redis_server):
    async with workers_stack(redis_server, 2) as (stack, engines), stack.client() as http:
        first = (await all_done(stack, await submit(http, 1, lambda i: chat("first question"), "/api/jobs/chat")))[0]
        home = first["worker_id"]
        ids = []
        for i in range(6):  # one at a time: each sees the others' load, and still follows the prefix
            ids += await submit(http, 1, lambda _: chat(f"question {i}"), "/api/jobs/chat")
        done = await all_done(stack, ids)
        assert [r["worker_id"] for r in done] == [home] * 6
        assert all(r["route"]["reason"] == "affinity" and r["route"]["prefix_chars"] >= len(SYSTEM) - BLOCK_CHARS
                   for r in done)
        # The engine found the shared system prompt in its cache each time.
        engine = engines[home]
        assert engine.prefix_cache_hits >= 6 * (len(SYSTEM) // 16 - 1) * 16
        other = next(e for w, e in engines.items() if w != home)
        assert other.prefix_cache_hits == 0

        # A chat that goes on (its history, one more turn) lands where its history ran.
        history = ({"role": "user", "content": "question 0"}, {"role": "assistant", "content": "answer 0"})
        more = (await all_done(stack, await submit(http, 1, lambda i: chat("and then?", history),
                                                   "/api/jobs/chat")))[0]
        assert more["worker_id"] == home and more["route"]["reason"] == "affinity"
        shown = (await http.get(f"/api/jobs/{more['job_id']}")).json()
        assert shown["route"] == {"worker_id": home, "reason": "affinity", "prefix_chars": more["route"]["prefix_chars"]}
        # The same through OpenAI's API, as a client that resends the conversation does.
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": chat("and then?", history)})
        assert r.status_code == 200, r.text
        (openai_chat,) = await records(stack, [r.json()["id"].removeprefix("chatcmpl-")])
        assert openai_chat["worker_id"] == home and openai_chat["route"]["reason"] == "affinity"

        expected = [f'vllama_route_decisions_total{{worker="{home}",model="{MODEL}",reason="affinity"}} 8',
                    f'vllama_route_decisions_total{{worker="{home}",model="{MODEL}",reason="balance"}} 1',
                    f'vllama_prefix_cache_hits_total{{worker="{home}",model="{MODEL}"}} {engine.prefix_cache_hits}']

        async def shown() -> bool:  # the cache counters travel in the next heartbeat
            text = (await http.get("/metrics")).text
            return all(line in text for line in expected)

        await async_wait_until(shown, 10, "/metrics to show the routes and the cache hits")


async def test_balance_wins_when_the_prefix_owner_is_much_busier(redis_server):
    async with workers_stack(redis_server, 2, answer_tokens=2000, max_jobs=8) as (stack, engines), \
            stack.client() as http:
        first = (await all_done(stack, await submit(http, 1, lambda i: chat("warm up"), "/api/jobs/chat",
                                                    options={"num_predict": 2})))[0]
        home = first["worker_id"]
        # Fill the prefix's owner with long jobs of its own (routed there by their own prefix).
        busy_ids = []
        for i in range(7):
            busy_ids += await submit(http, 1, lambda _: chat(f"long {i}"), "/api/jobs/chat")
        recs = await records(stack, busy_ids)
        owner_share = sum(1 for r in recs if r["route"]["worker_id"] == home)
        assert 0 < owner_share < 7  # affinity until the owner was much busier, then balance
        assert any(r["route"]["reason"] == "balance" and r["route"]["worker_id"] != home for r in recs)
        for job_id in busy_ids:
            await http.delete(f"/api/jobs/{job_id}")


async def test_a_job_routed_to_a_worker_that_never_takes_it_is_taken_by_another(redis_server):
    """A worker that stalled (its heartbeat still fresh, it takes nothing) strands nothing:
    once the route's hold lapses, the live worker takes the jobs routed to it."""
    async with workers_stack(redis_server, 1, route_hold_s=0.5) as (stack, engines), stack.client() as http:
        (real,) = engines
        stalled = WorkerInfo(worker_id="stalled-worker", host="nowhere", pid=1, models=[MODEL], state="ready",
                             loaded=[ModelStatus(name=MODEL, state="ready", max_jobs=64)], max_jobs=64,
                             started_at=0, heartbeat_at=0)

        async def beat() -> None:
            client = __import__("redis").Redis.from_url(redis_server.url)
            try:
                while True:
                    await asyncio.to_thread(registry.publish_heartbeat, client, stalled.model_copy(), 3.0)
                    await asyncio.sleep(0.25)
            finally:
                client.close()

        beating = asyncio.create_task(beat())
        try:
            await asyncio.sleep(0.5)
            await http.get("/api/ps")  # the API's view of the workers has both now
            ids = await submit(http, 12)
            done = await all_done(stack, ids, within=20)
            routed_away = [r for r in done if r["route"]["worker_id"] == "stalled-worker"]
            assert routed_away, "the stalled worker looked least loaded for some of the burst"
            assert all(r["worker_id"] == real for r in done)
        finally:
            beating.cancel()


def test_prefix_hashes_chain_so_a_shared_prefix_shares_its_hashes():
    def job(*contents: str) -> GenerationJob:
        return GenerationJob(job_id="x", model=MODEL, kind="chat",
                             messages=[ChatMessage(role="user", content=c) for c in contents])

    a, b = prefix_hashes(job(SYSTEM, "one")), prefix_hashes(job(SYSTEM, "two"))
    shared = len(SYSTEM) // BLOCK_CHARS
    assert a[:shared] == b[:shared] and len(a) >= shared
    assert prefix_hashes(job("x" + SYSTEM))[0] != a[0]
    assert prefix_hashes(job("short")) == []
