"""The API, Redis, arq and the worker together, with the fake engine standing in for vLLM.

Fast checks of the plumbing: frames, ordering, errors, limits, cancellation. The same
features are exercised through real vLLM in tests/e2e.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from common import keys
from common.errors import SERVER_BUSY_MESSAGE
from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until, ndjson_lines
from workers.fake_engine import FakeEngine

pytestmark = pytest.mark.asyncio(loop_scope="session")

EXPECTED_16 = "".join(f"tok{i} " for i in range(16))
FINAL_FIELDS = {"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration"}


async def test_generate_streams_every_token_in_order_then_stats(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "hello"})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        chunks = ndjson_lines(r.text)
        assert "".join(c["response"] for c in chunks) == EXPECTED_16
        assert all(c["done"] is False and c["model"] == MODEL for c in chunks[:-1])
        final = chunks[-1]
        assert final["done"] is True and final["done_reason"] == "stop"
        assert FINAL_FIELDS <= final.keys()
        assert final["eval_count"] == 16
        assert final["prompt_eval_count"] == len("<user>hello<assistant>")
        assert final["context"][-16:] == [1000 + i for i in range(16)]
        assert final["total_duration"] >= final["eval_duration"] > 0


async def test_chat_not_streaming_is_one_object_and_num_predict_limits_it(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/api/chat", json={
            "model": MODEL, "stream": False, "options": {"num_predict": 4, "no_such_option": 1},
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        })
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 "}
        assert body["done"] is True and body["done_reason"] == "length" and body["eval_count"] == 4
        assert "context" not in body


async def test_job_and_result_are_json_in_redis(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False})
        assert r.status_code == 200
        [record_key] = [k async for k in stack.redis.scan_iter(keys.job_record("*"))]
        record = json.loads(await stack.redis.get(record_key))
        assert record["status"] == "done" and record["model"] == MODEL
        # The answer went to its client: the record stays a minute, and arq keeps no result.
        assert 0 < await stack.redis.ttl(record_key) <= 60
        assert not await stack.redis.exists(f"arq:result:{record['job_id']}")
        # An async job's result is kept, readable.
        job = (await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": "y"})).json()
        await async_wait_until(lambda: stack.redis.exists(f"arq:result:{job['id']}"), 10, "the async job's result")
        result = json.loads(await stack.redis.get(f"arq:result:{job['id']}"))
        assert result["s"] is True and result["r"]["text"] == EXPECTED_16
        assert result["a"][0]["prompt"] == "y"  # the job spec itself, readable
        assert 60 < await stack.redis.ttl(keys.job_record(job["id"])) <= stack.settings.keep_result_s


async def test_unknown_model_is_404_with_the_pull_command(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/api/chat", json={"model": "llama3.1:8b", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404
        assert r.json() == {"error": "model 'llama3.1:8b' not found, try pulling it first: ollama pull llama3.1:8b"}


@pytest.mark.parametrize(
    ("body", "message_part"),
    [
        ('{"model": "fake:test", "prompt": ', "invalid JSON"),
        ("", "missing request body"),
        ("[1, 2]", "must be a JSON object"),
        ('{"model": "fake:test", "prompt": 5}', "prompt"),
        ('{"model": "fake:test", "prompt": "x", "options": {"temperature": "hot"}}', "options.temperature"),
        ('{"model": "fake:test", "prompt": "x", "options": {"num_predict": -3}}', "num_predict"),
        ('{"model": "fake:test", "prompt": "x", "format": "yaml"}', "invalid format"),
        ('{"model": "../etc", "prompt": "x"}', "invalid model name"),
        ('{"model": "fake:test", "prompt": "x", "raw": true, "system": "s"}', "raw mode"),
    ],
)
async def test_bad_input_is_400_saying_what_is_wrong(redis_server, body, message_part):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/api/generate", content=body)
        assert r.status_code == 400, r.text
        assert message_part in r.json()["error"]


async def test_prompt_longer_than_the_context_is_400_without_truncate(redis_server):
    async with fake_stack(redis_server.url, engine=FakeEngine(max_model_len=64)) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "x" * 100, "truncate": False})
        assert r.status_code == 400
        assert "context length is 64" in r.json()["error"]
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "x" * 20, "options": {"num_ctx": 16},
                                                   "truncate": False})
        assert r.status_code == 400 and "context length is 16" in r.json()["error"]


async def test_empty_prompt_loads_and_keep_alive_zero_unloads(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL})
        assert r.json()["done_reason"] == "load" and r.json()["done"] is True
        r = await http.post("/api/chat", json={"model": MODEL, "messages": [], "keep_alive": 0})
        assert r.json()["done_reason"] == "unload" and r.json()["message"]["role"] == "assistant"


async def test_disconnect_aborts_the_engine_request(redis_server):
    engine = FakeEngine(answer_tokens=10_000, step_s=0.02)
    async with fake_stack(redis_server.url, engine=engine) as stack, stack.client() as http:
        async with http.stream("POST", "/api/generate", json={"model": MODEL, "prompt": "long"}) as r:
            lines = r.aiter_lines()
            await anext(lines)
            await anext(lines)
        # the client is gone: the job must be cancelled in the worker and the engine
        await async_wait_until(lambda: _true(engine.aborted), 5, "the engine request to be aborted")
        assert engine.in_flight() == 0
        [record_key] = [k async for k in stack.redis.scan_iter(keys.job_record("*"))]
        await async_wait_until(
            lambda: _status_is(stack.redis, record_key, "cancelled"), 5, "the job record to say cancelled")


async def test_disconnect_aborts_every_choice_of_an_n_request(redis_server):
    engine = FakeEngine(answer_tokens=10_000, step_s=0.02)
    async with fake_stack(redis_server.url, engine=engine) as stack, stack.client() as http:
        async with http.stream("POST", "/v1/chat/completions", json={
                "model": MODEL, "n": 3, "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            lines = r.aiter_lines()
            for _ in range(8):  # three role chunks, then content
                await anext(lines)
        await async_wait_until(lambda: _true(len(engine.aborted) == 3), 5, "all three engine requests to be aborted")
        assert engine.in_flight() == 0


async def test_disconnect_while_waiting_for_a_non_streaming_answer_aborts_too(redis_server):
    engine = FakeEngine(answer_tokens=10_000, step_s=0.02)
    async with fake_stack(redis_server.url, engine=engine) as stack, stack.client() as http:
        with pytest.raises(Exception):
            await http.post("/api/chat", timeout=0.5, json={
                "model": MODEL, "stream": False, "messages": [{"role": "user", "content": "x"}]})
        await async_wait_until(lambda: _true(engine.aborted), 5, "the engine request to be aborted")


async def test_more_waiting_jobs_than_the_limit_get_503_and_the_rest_complete(redis_server):
    engine = FakeEngine(answer_tokens=30, step_s=0.02)
    async with fake_stack(redis_server.url, engine=engine, max_jobs=2, max_queue=2) as stack, stack.client() as http:

        async def one() -> httpx.Response:
            return await http.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False})

        # A burst of 8 at once: 2 run, 2 may wait, the other 4 are refused straight away.
        results = await asyncio.gather(*(one() for _ in range(8)))
        assert sorted(r.status_code for r in results) == [200] * 4 + [503] * 4
        for r in results:
            if r.status_code == 503:
                assert r.json() == {"error": SERVER_BUSY_MESSAGE}
            else:
                assert r.json()["response"] == "".join(f"tok{i} " for i in range(30))
        # Refused jobs leave nothing behind; admitted ones are all recorded done.
        statuses = [json.loads(await stack.redis.get(k))["status"]
                    async for k in stack.redis.scan_iter(keys.job_record("*"))]
        assert statuses == ["done"] * 4
        assert await stack.redis.zcard(keys.generation_queue(MODEL)) == 0


async def test_health_reports_workers_and_503_without_one(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.get("/health")
        assert r.status_code == 200 and r.json()["workers"][0]["models"] == [MODEL]
    async with fake_stack(redis_server.url, worker=False) as stack, stack.client() as http:
        r = await http.get("/health")
        assert r.status_code == 503 and r.json()["workers"] == []
        assert (await http.get("/")).text == "Ollama is running"
        assert (await http.head("/")).status_code == 200
        assert "version" in (await http.get("/api/version")).json()


async def test_a_gap_in_the_frame_sequence_fails_loudly(redis_server):
    """Frames lost in transit must not turn into a silently wrong answer."""
    async with fake_stack(redis_server.url, worker=False) as stack:
        from api.dispatch import Dispatcher, JobStream
        from api.pubsub import FrameMultiplexer
        from common.errors import StreamBroken
        from common.protocol import GenerationJob, StartFrame, TokenFrame
        from workers.frames import bundle

        mux = FrameMultiplexer(stack.redis)
        await mux.start()
        try:
            job = GenerationJob(job_id="gap-test", model=MODEL, kind="generate", prompt="x")
            stream = JobStream(Dispatcher(stack.redis, mux, stack.settings), job)
            await stream.open(limit=100)
            assert job.reply_to == mux.reply_channel  # where the worker sends its frames
            for frame in (StartFrame(seq=0, worker_id="w"), TokenFrame(seq=2, text="b")):
                await stack.redis.publish(job.reply_to, bundle({job.job_id: [frame.model_dump_json().encode()]}))
            batches = stream.batches()
            assert isinstance((await anext(batches))[0], StartFrame)
            with pytest.raises(StreamBroken, match="frame 1 expected, 2 received"):
                await anext(batches)
            await stream.close()
        finally:
            await mux.stop()


async def _true(value) -> bool:
    return bool(value)


async def _status_is(redis, key, status) -> bool:
    raw = await redis.get(key)
    return raw is not None and json.loads(raw)["status"] == status


async def test_redis_down_is_a_503_that_says_what_to_check_and_work_resumes_after(tmp_path):
    from cli.embedded_redis import EmbeddedRedis

    own = EmbeddedRedis(data_dir=tmp_path).start()
    body = {"model": MODEL, "prompt": "x", "stream": False}
    try:
        async with fake_stack(own.url) as stack, stack.client() as http:
            assert (await http.post("/api/generate", json=body)).status_code == 200
            own.stop()
            r = await http.post("/api/generate", json=body)
            assert r.status_code == 503
            assert "VLLAMA_REDIS_URL" in r.json()["error"]
            h = await http.get("/health")
            assert h.status_code == 503 and h.json()["status"] == "unavailable"
            await asyncio.sleep(1.5)  # the worker's poll loop meets the outage too
            own.start()  # same port, empty: the worker must re-register and take jobs again

            async def served() -> bool:
                return (await http.post("/api/generate", json=body)).status_code == 200

            await async_wait_until(served, 10, "the stack to serve again after Redis came back")
    finally:
        own.stop()
