"""Faults on one host, over real Redis and HTTP with the fake engine: liveness judged by Redis
rather than clocks, many followers of one job, a reader too slow to keep up, jobs that vanish
from Redis or are taken by a worker that dies before starting them, the longest wait in a
queue, and a store's catalog written again after Redis lost it. tests/multihost runs the
faults that need several hosts."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from api.pubsub import FrameMultiplexer, Overflowed
from common import keys, registry
from common.job_queue import in_progress_key
from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until
from tests.model_factory import write_model
from workers.fake_engine import FakeEngine


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


async def test_liveness_is_the_record_ttl_not_the_writers_clock(redis_server):
    """A worker whose clock is far off is alive while its record lives, and dead once Redis
    expired it, whatever time it wrote; the dead one leaves the index."""
    from common.redis_conn import connect

    redis = await connect(redis_server.url)
    try:
        await redis.flushdb()
        for worker_id, skew_s in (("ahead", 3600.0), ("behind", -3600.0)):
            info = registry.WorkerInfo(worker_id=worker_id, host="h", pid=1, models=[MODEL], state="ready",
                                       started_at=time.time() + skew_s, heartbeat_at=time.time() + skew_s)
            await redis.set(keys.worker_record(worker_id), info.model_dump_json(), px=60_000)
            await redis.zadd(keys.WORKERS, {worker_id: int((time.time() + skew_s) * 1000)})
        assert {w.worker_id for w in await registry.live_workers(redis)} == {"ahead", "behind"}

        await redis.pexpire(keys.worker_record("behind"), 1)
        await asyncio.sleep(0.05)
        assert [w.worker_id for w in await registry.live_workers(redis)] == ["ahead"]
        assert await redis.zrange(keys.WORKERS, 0, -1) == [b"ahead"]
    finally:
        await redis.aclose()


async def test_two_followers_on_one_api_process_each_get_every_token(redis_server):
    async with fake_stack(redis_server.url, engine=FakeEngine(step_s=0.02, answer_tokens=1000)) as stack, stack.client() as http:
        job = (await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": "hi", "priority": "interactive",
                                                           "options": {"num_predict": 60}})).json()
        streams = await asyncio.gather(*(http.get(f"/api/jobs/{job['id']}/stream") for _ in range(3)))
        expected = "".join(f"tok{i} " for i in range(60))
        for r in streams:
            got = lines(r.text)
            assert "error" not in got[-1], got[-1]
            assert "".join(line["response"] for line in got) == expected and got[-1]["done"]


async def test_a_reader_that_falls_behind_is_cut_off_not_buffered_without_bound(redis_server):
    from common.redis_conn import connect

    redis = await connect(redis_server.url)
    mux = FrameMultiplexer(redis, max_backlog=10)
    await mux.start()
    try:
        slow, fast = await mux.subscribe("vllama:test:slow"), await mux.subscribe("vllama:test:slow")
        received = []
        for i in range(30):
            await redis.publish("vllama:test:slow", str(i))
            received.append(await fast.get(5))  # the reader that keeps up gets everything
        assert received == [str(i).encode() for i in range(30)]
        with pytest.raises(Overflowed, match="too slowly"):
            while True:
                assert await slow.get(1) is not None
        assert not slow._items  # the backlog was let go
        await mux.unsubscribe(slow)
        await redis.publish("vllama:test:slow", "after")
        assert await fast.get(5) == b"after"  # the channel stays subscribed for the other reader
        await mux.unsubscribe(fast)
        assert mux.active == 0
    finally:
        await mux.stop()
        await redis.aclose()


async def test_a_slow_async_follower_catches_up_from_the_kept_frames(redis_server):
    from api import jobs
    from api.dispatch import Dispatcher
    from common.protocol import DoneFrame, TokenFrame

    async with fake_stack(redis_server.url, engine=FakeEngine(step_s=0.002, answer_tokens=1000)) as stack, stack.client() as http:
        mux = FrameMultiplexer(stack.redis, max_backlog=5)  # the follower below reads slower than the engine
        await mux.start()
        try:
            job = (await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": "hi",
                                                               "priority": "interactive",
                                                               "options": {"num_predict": 300}})).json()
            text, done = [], None
            async for frame in jobs.follow(Dispatcher(stack.redis, mux, stack.settings), job["id"]):
                if isinstance(frame, TokenFrame):
                    text.append(frame.text)
                elif isinstance(frame, DoneFrame):
                    done = frame
                await asyncio.sleep(0.01)
            assert done is not None and "".join(text) == "".join(f"tok{i} " for i in range(300))
            assert mux.active == 0
        finally:
            await mux.stop()


async def test_a_queued_job_that_vanishes_from_redis_ends_its_stream_with_an_error(redis_server):
    """As after a Redis restart that lost its data: the client is told, not left waiting."""
    async with fake_stack(redis_server.url, worker=False) as stack, stack.client() as http:
        # No worker holds the model, so the request waits in the queue (it would load on demand).
        await _fake_worker_record(stack.redis)
        start = time.monotonic()

        async def lose_it() -> None:
            await async_wait_until(lambda: stack.redis.zcard(keys.generation_queue(MODEL)), 5, "the job queued")
            await stack.redis.flushdb()
            await _fake_worker_record(stack.redis)

        loser = asyncio.create_task(lose_it())
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "x"})
        await loser
        got = lines(r.text)
        assert "lost from the queue" in got[-1]["error"], got
        print(f"\nvanished job: error line after {time.monotonic() - start:.1f} s")


async def test_a_job_taken_by_a_worker_that_died_before_starting_it_fails(redis_server):
    async with fake_stack(redis_server.url, worker=False, heartbeat_ttl_s=1.0) as stack, stack.client() as http:
        await _fake_worker_record(stack.redis)

        async def take_it() -> None:  # what arq does as it starts a job; then its worker dies
            ids = await async_wait_until(lambda: stack.redis.zrange(keys.generation_queue(MODEL), 0, -1), 5, "a job")
            await stack.redis.set(in_progress_key(ids[0].decode()), b"1", px=3_600_000)

        taker = asyncio.create_task(take_it())
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False})
        await taker
        assert r.status_code == 503 and "died before starting it" in r.json()["error"]


async def test_no_worker_starts_it_in_time_is_a_503_saying_so(redis_server):
    async with fake_stack(redis_server.url, worker=False, queue_timeout_s=1.0) as stack, stack.client() as http:
        await _fake_worker_record(stack.redis)
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False})
        assert r.status_code == 503 and "VLLAMA_QUEUE_TIMEOUT_S" in r.json()["error"]
        assert await stack.redis.zcard(keys.generation_queue(MODEL)) == 0  # withdrawn: it will not run later


async def test_streams_end_and_the_catalog_comes_back_after_a_redis_restart_that_lost_everything(tmp_path):
    """Redis stopped mid-stream and started again empty (no persistence): the streaming client
    gets a final line (its answer or an error), and the store writes its catalog again, so
    /api/tags lists the model without restarting anything."""
    from cli.embedded_redis import EmbeddedRedis

    own = EmbeddedRedis(data_dir=tmp_path / "redis").start()
    write_model(tmp_path, "tiny:1b")
    try:
        async with fake_stack(own.url, engine=FakeEngine(step_s=0.02, answer_tokens=10**6), pull_worker=True,
                              home=tmp_path) as stack, stack.client() as http:
            await async_wait_until(lambda: _tags(http), 10, "the store's catalog")
            async with http.stream("POST", "/api/generate", json={"model": MODEL, "prompt": "x",
                                                                   "options": {"num_predict": 300}}) as r:
                got = []
                async for line in r.aiter_lines():
                    got.append(json.loads(line))
                    if len(got) == 5:
                        own.stop()
                        stopped = time.monotonic()
                        await asyncio.sleep(1)
                        own.start()
            ended_s = time.monotonic() - stopped
            assert "error" in got[-1] or got[-1]["done"], got[-1]
            await async_wait_until(lambda: _tags(http), 20, "the catalog written again")
            back_s = time.monotonic() - stopped

            async def served() -> bool:
                r = await http.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False,
                                                            "options": {"num_predict": 3}})
                return r.status_code == 200 and r.json()["response"] == "tok0 tok1 tok2 "

            await async_wait_until(served, 20, "the stack to serve again")
            print(f"\nRedis restarted empty: the stream's last line ({'error' if 'error' in got[-1] else 'done'}) "
                  f"after {ended_s:.1f} s, catalog back after {back_s:.1f} s, "
                  f"serving again after {time.monotonic() - stopped:.1f} s")
    finally:
        own.stop()


async def _status(http, path: str, status: int) -> bool:
    return (await http.get(path)).status_code == status


async def _tags(http) -> bool:
    return "tiny:1b" in {m["name"] for m in (await http.get("/api/tags")).json()["models"]}


async def _fake_worker_record(redis) -> None:
    """A live worker that holds MODEL but takes no jobs: requests queue for it."""
    info = registry.WorkerInfo(worker_id="idle", host="h", pid=1, models=[MODEL], state="ready",
                               started_at=time.time(), heartbeat_at=time.time())
    await redis.set(keys.worker_record("idle"), info.model_dump_json(), px=600_000)
    await redis.zadd(keys.WORKERS, {"idle": 0})


async def test_a_dead_engine_stops_its_worker_taking_jobs_and_is_started_again(redis_server):
    """The engine process dies mid-answer: its client gets an error line, the worker takes no
    more jobs for it and shows it failed (not ready), requests sent meanwhile wait instead of
    failing one after another, and the worker starts the engine again and serves them."""
    engines: list[FakeEngine] = []

    def factory(name, path):  # runs in a thread; a real engine takes a while to start too
        time.sleep(2)
        engines.append(FakeEngine(step_s=0.01, answer_tokens=1000))
        return engines[-1]

    first = FakeEngine(step_s=0.02, answer_tokens=1000)
    async with fake_stack(redis_server.url, engine=first, engine_factory=factory) as stack, stack.client() as http:
        async with http.stream("POST", "/api/generate", json={"model": MODEL, "prompt": "x",
                                                               "options": {"num_predict": 500}}) as r:
            got = []
            async for line in r.aiter_lines():
                got.append(json.loads(line))
                if len(got) == 3:
                    first.kill()
                    killed = time.monotonic()
        assert "process died" in got[-1].get("error", ""), got[-1]
        error_s = time.monotonic() - killed

        async def shown_failed() -> bool:
            h = await http.get("/health")
            ps = (await http.get("/api/ps")).json()["models"]
            states = [w["state"] for m in ps for w in m["workers"]]
            return h.status_code == 503 and (not ps or "ready" not in states)

        await async_wait_until(shown_failed, 10, "the worker to show its model not ready")
        after = [asyncio.create_task(http.post("/api/generate", json={
            "model": MODEL, "prompt": "x", "stream": False, "options": {"num_predict": 3}})) for _ in range(10)]
        answers = await asyncio.gather(*after)
        assert [a.status_code for a in answers] == [200] * 10, [a.text for a in answers]
        assert engines, "the engine was started again"
        await async_wait_until(lambda: _status(http, "/health", 200), 10, "/health to say ready again")
        print(f"\ndead engine: error line after {error_s:.2f} s, served again after "
              f"{time.monotonic() - killed:.1f} s")


async def test_an_engine_that_keeps_dying_ends_the_worker_saying_why(redis_server):
    from common.errors import VllamaError
    from workers.main import GenerationWorker

    engines: list[FakeEngine] = []

    def factory(name, path):
        engines.append(FakeEngine())
        engines[-1].kill()  # dies as soon as it serves
        return engines[-1]

    async with fake_stack(redis_server.url, worker=False) as stack:
        from common.redis_conn import connect

        worker = GenerationWorker(stack.settings, engine=factory(MODEL, None), engine_factory=factory)
        with pytest.raises(VllamaError, match="died 4 times"):
            await asyncio.wait_for(worker.run(redis=await connect(redis_server.url)), 60)
        assert len(engines) == 4


async def test_async_jobs_batches_and_files_accepted_before_a_redis_crash_are_there_after_it(tmp_path):
    """Redis SIGKILLed under a backlog of async jobs and a batch, and started again from its
    append-only file: the running jobs ride it out (their frames and records are sent again
    until Redis answers), the queued ones run after, every answer is whole, and the uploaded
    file and the batch are there and the batch completes."""
    import os
    import signal

    from cli.embedded_redis import EmbeddedRedis
    from tests.test_batches import chat_line, client_for, finished, start_batch

    own = EmbeddedRedis(data_dir=tmp_path / "redis", appendfsync="everysec").start()
    try:
        async with fake_stack(own.url, engine=FakeEngine(step_s=0.02, answer_tokens=1000), max_jobs=4) as stack, \
                stack.client() as http:
            openai_client = client_for(stack)
            batch = await start_batch(openai_client, [chat_line(i) for i in range(6)])
            ids = [(await http.post("/api/jobs/generate", json={
                "model": MODEL, "prompt": "hi", "options": {"num_predict": 60}})).json()["id"] for _ in range(8)]
            await async_wait_until(lambda: _running(http, ids), 10, "some jobs to be running")
            await asyncio.sleep(1.2)  # past the append-only file's fsync
            os.kill(own.pid, signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.sleep(0.5)
            own.start()

            async def all_ended() -> bool:
                statuses = [(await http.get(f"/api/jobs/{i}")).json()["status"] for i in ids]
                return all(s in ("done", "failed", "cancelled") for s in statuses)

            await async_wait_until(all_ended, 60, "every job to end")
            jobs = [(await http.get(f"/api/jobs/{i}")).json() for i in ids]
            assert [j["status"] for j in jobs] == ["done"] * 8, [(j["status"], j["error"]) for j in jobs]
            assert all(j["output"] == "".join(f"tok{i} " for i in range(60)) for j in jobs)
            *_, ended = await finished(openai_client, batch.id)
            assert ended.status == "completed" and ended.request_counts.completed == 6, ended
            assert (await openai_client.files.content(batch.input_file_id)).text.count("\n") == 6
            output = (await openai_client.files.content(ended.output_file_id)).text.splitlines()
            assert [json.loads(line)["custom_id"] for line in output] == [f"req-{i}" for i in range(6)]
            print(f"\nRedis crash under 8 async jobs: all done {time.monotonic() - killed:.1f} s after the kill")
    finally:
        own.stop()


async def _running(http, ids: list[str]) -> bool:
    return "running" in [(await http.get(f"/api/jobs/{i}")).json()["status"] for i in ids]
