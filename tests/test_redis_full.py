"""Redis at its maxmemory (policy noeviction, as `vllama serve` sets it): requests that need a
write get 507 with what to do, not 500, nothing half-written is left behind, and once memory
is freed the same requests work again. A Redis of its own, small, filled with ballast; the
whole stack with the fake engine."""

from __future__ import annotations

import redis
import redis.asyncio
import pytest

from api.errors import REDIS_FULL
from cli.embedded_redis import EmbeddedRedis
from common import keys
from tests.fake_stack import MODEL, fake_stack

BALLAST = "ballast:"
GENERATE = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 3}}


@pytest.fixture
def small_redis(tmp_path):
    server = EmbeddedRedis(data_dir=tmp_path / "redis", maxmemory="16mb").start()
    yield server
    server.stop()


async def _fill(client: redis.asyncio.Redis, margin: int = 4 << 20) -> None:
    """Ballast until Redis refuses a write, then ``margin`` bytes beyond its maxmemory: at the
    edge, memory freed by a closed connection or a drained buffer would let a write through
    now and then. SETRANGE grows a string far beyond its own small command, once, while
    Redis is just under its limit."""
    n = 0
    value = "x" * 1000
    while True:
        try:
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(200):
                    pipe.set(f"{BALLAST}{n}", value)
                    n += 1
                await pipe.execute()
        except redis.exceptions.OutOfMemoryError:
            break
    while True:
        try:
            await client.setrange(f"{BALLAST}beyond", margin, "x")
            return
        except redis.exceptions.OutOfMemoryError:
            n -= 1
            await client.delete(f"{BALLAST}{n}")


async def _empty(client: redis.asyncio.Redis) -> None:
    async for key in client.scan_iter(f"{BALLAST}*", count=1000):
        await client.unlink(key)


async def test_a_full_redis_answers_507_leaves_no_half_job_and_serves_again_once_freed(small_redis):
    ballast = redis.asyncio.Redis.from_url(small_redis.url)
    # A long heartbeat TTL: a full Redis refuses the worker's heartbeats too, and the test is
    # about the API's answer, not about a worker that looks gone.
    async with fake_stack(small_redis.url, heartbeat_ttl_s=120.0) as stack, stack.client() as http:
        r = await http.post("/api/generate", json=GENERATE)
        assert r.status_code == 200, r.text
        jobs_before = [k async for k in stack.redis.scan_iter(keys.job_record("*"))]
        await _fill(ballast)
        info = await ballast.info("memory")
        assert info["maxmemory_policy"] == "noeviction"
        assert info["used_memory"] > info["maxmemory"] + (2 << 20), info

        # Ollama's API, streaming or not, with and without a keep_alive (the enqueue script
        # writes it, or deletes it, before the job).
        for body in (GENERATE, {**GENERATE, "stream": True}, {**GENERATE, "keep_alive": "10m"}):
            r = await http.post("/api/generate", json=body)
            assert r.status_code == 507, (body, r.status_code, r.text)
            assert r.json() == {"error": REDIS_FULL}
        r = await http.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                               "stream": False})
        assert r.status_code == 507 and "VLLAMA_REDIS_MAXMEMORY" in r.json()["error"], r.text
        # OpenAI's API: its error object, with the same message.
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 3,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 507, r.text
        assert r.json()["error"]["message"] == REDIS_FULL and r.json()["error"]["type"] == "server_error"
        # An async job and a file: records of their own.
        r = await http.post("/api/jobs/generate", json=GENERATE)
        assert r.status_code == 507, r.text
        r = await http.post("/v1/files", files={"file": ("in.jsonl", b'{"a": 1}\n')}, data={"purpose": "batch"})
        assert r.status_code == 507, r.text

        # Nothing of the refused requests was left: no job record, no queued job.
        assert [k async for k in stack.redis.scan_iter(keys.job_record("*"))] == jobs_before
        assert await stack.redis.zcard(keys.queue_for(MODEL, "interactive")) == 0

        await _empty(ballast)
        r = await http.post("/api/generate", json=GENERATE)
        assert r.status_code == 200 and r.json()["response"] == "tok0 tok1 tok2 ", r.text
        r = await http.post("/api/jobs/generate", json=GENERATE)
        assert r.status_code in (200, 202), r.text
    await ballast.aclose()
