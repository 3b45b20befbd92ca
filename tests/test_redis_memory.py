"""Redis's memory is bounded: after 10,000 requests it is back where it was.

The whole stack runs with the fake engine (tests/fake_stack.py): a mix of /api/generate and
/api/chat, streaming and not, and /v1/chat/completions, 32 at a time, some of them cancelled
mid-stream by their client leaving. Once the API's housekeeping has run, Redis must hold what
it held before (within 10%), and no per-job key may be left: arq's payload, in-progress,
retry and result keys, our job records and kept frames, abort requests, running entries and
queue members. A key that is left is listed by pattern in the failure message.

Two waits are shortened so that the test need not sit through them: the minute an ended
streamed job's record is kept for redis-cli (ENDED_STREAM_RECORD_S) and the minute an abort
request may wait for its worker (ABORT_KEEP_S). tests/test_redis_pruning.py checks them at
their real length. The figures are printed (pytest -s shows them)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
from arq.constants import abort_jobs_ss

import common.job_queue
from common import keys
from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until
from workers.fake_engine import FakeEngine

pytestmark = pytest.mark.asyncio(loop_scope="session")

REQUESTS = 10_000
CONCURRENCY = 32
CANCEL_EVERY = 250  # one request in this many leaves mid-stream
WARM_UP = 1000  # long enough for the connection pools and Redis's own tables to reach their size
TOKENS = 3  # per answer: the test is about what each request leaves in Redis, not about tokens

# Keys that exist once per job (a pattern per kind), and the shared keys whose members are jobs.
PER_JOB = re.compile(r"^(arq:(job|result|retry|in-progress):|vllama:(job|job-frames):)")


def _messages() -> list[dict]:
    return [{"role": "user", "content": "hello"}]


async def _one(http: httpx.AsyncClient, i: int) -> str:
    """Request ``i`` of the mix; returns how it ended ("ok", "cancelled" or an error)."""
    kind = i % 6
    options = {"num_predict": TOKENS}
    if i % CANCEL_EVERY == CANCEL_EVERY - 1:  # a long answer, left after its first tokens
        async with http.stream("POST", "/api/generate", json={
                "model": MODEL, "prompt": f"leave {i}", "options": {"num_predict": 2000}}) as r:
            lines = r.aiter_lines()
            await anext(lines)
            await anext(lines)
        return "cancelled"
    if kind < 2:
        body = {"model": MODEL, "prompt": f"p{i}", "stream": kind == 0, "options": options}
        path = "/api/generate"
    elif kind < 4:
        body = {"model": MODEL, "messages": _messages(), "stream": kind == 2, "options": options}
        path = "/api/chat"
    else:
        body = {"model": MODEL, "messages": _messages(), "stream": kind == 4, "max_tokens": TOKENS}
        path = "/v1/chat/completions"
    if body["stream"]:
        async with http.stream("POST", path, json=body) as r:
            async for _ in r.aiter_bytes():
                pass
            status = r.status_code
    else:
        status = (await http.post(path, json=body)).status_code
    return "ok" if status == 200 else f"http {status}"


async def _run(http: httpx.AsyncClient, count: int, start: int = 0) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    next_i = iter(range(start, start + count))

    async def client() -> None:
        for i in next_i:
            try:
                outcomes[await _one(http, i)] += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                outcomes[f"exception {type(exc).__name__}"] += 1

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return outcomes


async def _per_job_left(redis) -> dict[str, int]:
    """What per-job state is left, by key pattern (and shared key, for members)."""
    left: Counter[str] = Counter()
    async for raw in redis.scan_iter(count=1000):
        key = raw.decode()
        if m := PER_JOB.match(key):
            left[m.group(1) + "*"] += 1
    for name, size in (("arq:abort members", await redis.zcard(abort_jobs_ss)),
                       ("vllama:running entries", await redis.hlen(keys.RUNNING)),
                       ("queued or running jobs", await redis.zcard(keys.generation_queue(MODEL))
                        + await redis.zcard(keys.batch_queue(MODEL)))):
        if size:
            left[name] = size
    return dict(left)


async def _settled(redis) -> dict[str, int]:
    """Wait until no per-job state is left (expiries and housekeeping take a few seconds);
    returns what is left if that never happens."""
    left: dict[str, int] = {}

    async def empty() -> bool:
        nonlocal left
        left = await _per_job_left(redis)
        return not left

    try:
        await async_wait_until(empty, 30, "per-job keys to be gone", interval_s=0.5)
    except TimeoutError:
        pass
    return left


@dataclass
class Memory:
    used: int  # INFO memory used_memory
    clients: int  # of which the connections' buffers (mem_clients_normal)
    connections: int
    keys: int  # DBSIZE, less the sweep's lock (it lapses and is taken again every few seconds)

    @property
    def held(self) -> int:
        """What Redis holds apart from its connections' buffers, which follow how many
        connections the clients' pools keep open (a few more after a burst), not how many
        requests were served."""
        return self.used - self.clients

    def __str__(self) -> str:
        return (f"{self.used} B used_memory ({self.held} B without the {self.connections} connections' "
                f"{self.clients} B), {self.keys} keys")


async def _memory(redis) -> Memory:
    memory, clients = await redis.info("memory"), await redis.info("clients")
    return Memory(int(memory["used_memory"]), int(memory["mem_clients_normal"]), int(clients["connected_clients"]),
                  int(await redis.dbsize()) - int(await redis.exists(keys.SWEEP_LOCK)))


async def test_redis_memory_is_back_where_it_was_after_10000_requests(redis_server, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)  # arq logs every job's start and end: 20,000 lines to keep
    monkeypatch.setattr(common.job_queue, "ENDED_STREAM_RECORD_S", 1)
    monkeypatch.setattr(common.job_queue, "ABORT_KEEP_S", 1)
    engine = FakeEngine(answer_tokens=10_000, step_s=0.001)
    async with fake_stack(redis_server.url, engine=engine, max_queue=4 * CONCURRENCY) as stack, \
            stack.client(limits=httpx.Limits(max_connections=2 * CONCURRENCY)) as http:
        redis = stack.redis
        warm = await _run(http, WARM_UP)
        assert warm["ok"] == WARM_UP - WARM_UP // CANCEL_EVERY, warm
        assert not await _settled(redis), "the warm-up left per-job keys"
        before = await _memory(redis)

        started = time.monotonic()
        outcomes = await _run(http, REQUESTS, start=WARM_UP)
        elapsed = time.monotonic() - started
        busiest = await _memory(redis)
        left = await _settled(redis)
        after = await _memory(redis)

    print(f"\nRedis before: {before}\nRedis right after the last answer: {busiest}\nRedis after: {after}\n"
          f"{REQUESTS} requests ({dict(outcomes)}) in {elapsed:.1f} s ({REQUESTS / elapsed:.0f} requests/s, "
          f"{CONCURRENCY} at a time)")
    cancelled = REQUESTS // CANCEL_EVERY
    assert outcomes == Counter(ok=REQUESTS - cancelled, cancelled=cancelled), outcomes
    assert not left, f"per-job keys left after {REQUESTS} requests: {left}"
    assert after.keys <= before.keys, f"{before.keys} keys before, {after.keys} after"
    # Within 10% of the start: the connections' buffers apart (they follow how many
    # connections the pools keep, not the requests served), used_memory is where it was.
    assert after.held <= before.held + 0.10 * before.used, f"before: {before}; after {REQUESTS} requests: {after}"
