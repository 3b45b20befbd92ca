"""OpenAI's Files and Batch APIs with the official client, over real Redis and HTTP with the
fake engine standing in for vLLM (tests/e2e runs a small batch through real vLLM)."""

from __future__ import annotations

import asyncio
import io
import json

import openai
import pytest
from arq.constants import result_key_prefix

from common import keys
from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until, run_cli
from tests.model_factory import write_model
from workers.fake_engine import FakeEngine


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def chat_line(i: int, model: str = MODEL, **body) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 3,
                     **body}}


def client_for(stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)


async def start_batch(client, rows: list[dict]):
    """Upload ``rows`` as a JSONL file and run them as a chat batch."""
    f = await client.files.create(file=("batch.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
    return await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")


async def finished(client, batch_id: str, timeout_s: float = 60):
    seen = []

    async def done() -> bool:
        batch = await client.batches.retrieve(batch_id)
        seen.append(batch)
        return batch.status in ("completed", "failed", "cancelled", "expired")

    await async_wait_until(done, timeout_s, f"batch {batch_id} to finish")
    return seen


async def test_files_round_trip(redis_server):
    async with fake_stack(redis_server.url) as stack:
        client = client_for(stack)
        data = jsonl([chat_line(0)])
        f = await client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        assert f.id.startswith("file-") and f.bytes == len(data) and f.purpose == "batch" and f.filename == "in.jsonl"
        assert (await client.files.retrieve(f.id)).id == f.id
        assert (await client.files.content(f.id)).content == data
        assert [x.id for x in (await client.files.list()).data] == [f.id]
        assert (await client.files.delete(f.id)).deleted
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(f.id)
        with pytest.raises(openai.BadRequestError):
            await client.files.create(file=("x.jsonl", io.BytesIO(b"{}")), purpose="nonsense")
        await client.close()


async def test_a_thousand_lines_each_answered_exactly_once(redis_server):
    async with fake_stack(redis_server.url, engine=FakeEngine(step_s=0.001)) as stack:
        client = client_for(stack)
        rows = [chat_line(i) for i in range(1000)]
        f = await client.files.create(file=("big.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
        batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                            completion_window="24h", metadata={"run": "t"})
        assert batch.status == "in_progress" and batch.request_counts.total == 1000 and batch.metadata == {"run": "t"}
        seen = await finished(client, batch.id, timeout_s=120)
        counts = [(b.request_counts.completed, b.request_counts.failed) for b in seen]
        assert counts == sorted(counts) and all(c + e <= 1000 for c, e in counts)  # true while it ran
        done = seen[-1]
        assert done.status == "completed" and done.request_counts.completed == 1000 and done.error_file_id is None
        lines = [json.loads(x) for x in (await client.files.content(done.output_file_id)).text.splitlines()]
        assert [x["custom_id"] for x in lines] == [f"req-{i}" for i in range(1000)]  # each once, in order
        first = lines[0]["response"]
        assert first["status_code"] == 200 and first["body"]["object"] == "chat.completion"
        assert first["body"]["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
        assert first["body"]["usage"]["completion_tokens"] == 3
        assert len({x["id"] for x in lines}) == 1000
        listed = await client.batches.list()
        assert [b.id for b in listed.data] == [batch.id]
        await client.close()


async def test_lines_that_cannot_run_go_to_the_error_file(redis_server):
    async with fake_stack(redis_server.url) as stack:
        client = client_for(stack)
        rows = [chat_line(0), chat_line(1, model="nowhere:1b"), chat_line(2, temperature=9), chat_line(3, n=2)]
        batch = await start_batch(client, rows)
        done = (await finished(client, batch.id))[-1]
        assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (1, 3)
        output = [json.loads(x) for x in (await client.files.content(done.output_file_id)).text.splitlines()]
        errors = {json.loads(x)["custom_id"]: json.loads(x) for x in
                  (await client.files.content(done.error_file_id)).text.splitlines()}
        assert [x["custom_id"] for x in output] == ["req-0"]
        assert errors["req-1"]["response"]["status_code"] == 404
        assert "ollama pull" in errors["req-1"]["response"]["body"]["error"]["message"]
        assert errors["req-2"]["response"]["status_code"] == 400
        assert "temperature" in errors["req-2"]["response"]["body"]["error"]["message"]
        assert "n must be 1" in errors["req-3"]["response"]["body"]["error"]["message"]

        # A malformed file fails the whole batch, naming the lines.
        bad = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\nnot json\n'
        f = await client.files.create(file=("bad.jsonl", io.BytesIO(bad)), purpose="batch")
        failed = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                             completion_window="24h")
        assert failed.status == "failed"
        assert [(e.code, e.line) for e in failed.errors.data] == [("mismatched_endpoint", 1), ("invalid_request", 2)]
        with pytest.raises(openai.NotFoundError):
            await client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions",
                                        completion_window="24h")
        with pytest.raises(openai.BadRequestError):
            await client.batches.create(input_file_id=f.id, endpoint="/v1/moderations", completion_window="24h")
        await client.close()


async def test_cancel_stops_the_remaining_lines(redis_server):
    engine = FakeEngine(answer_tokens=20, step_s=0.02)  # 0.4 s a line
    async with fake_stack(redis_server.url, engine=engine, max_jobs=4, batch_share=0.5) as stack:
        client = client_for(stack)
        rows = [chat_line(i, max_tokens=20) for i in range(40)]
        batch = await start_batch(client, rows)
        await async_wait_until(lambda: _some_done(client, batch.id), 20, "a few lines to finish")
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        done = (await finished(client, batch.id))[-1]
        assert done.status == "cancelled"
        ok = [json.loads(x)["custom_id"] for x in (await client.files.content(done.output_file_id)).text.splitlines()]
        cancelled = [json.loads(x) for x in (await client.files.content(done.error_file_id)).text.splitlines()]
        assert sorted(ok + [x["custom_id"] for x in cancelled], key=lambda c: int(c[4:])) == \
            [f"req-{i}" for i in range(40)]  # none lost, none twice
        assert all(x["error"]["code"] == "batch_cancelled" for x in cancelled) and len(cancelled) > 20
        assert len(engine.started) < 40  # the queued lines never ran
        assert await stack.redis.zcard(keys.batch_queue(MODEL)) == 0
        with pytest.raises(openai.ConflictError):
            await client.batches.cancel(batch.id)
        await client.close()


async def _some_done(client, batch_id: str) -> bool:
    return (await client.batches.retrieve(batch_id)).request_counts.completed >= 2


async def test_a_chat_during_a_big_batch_starts_at_once(redis_server):
    engine = FakeEngine(answer_tokens=30, step_s=0.01)
    async with fake_stack(redis_server.url, engine=engine, max_jobs=4, batch_share=0.5) as stack:
        client = client_for(stack)
        rows = [chat_line(i, max_tokens=30) for i in range(100)]  # ~15 s of batch work, 2 at a time
        batch = await start_batch(client, rows)
        await asyncio.sleep(0.3)
        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "now"}],
                                                      max_tokens=2, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        counts = (await client.batches.retrieve(batch.id)).request_counts
        assert counts.completed < 20  # the chat did not wait for the batch
        await client.batches.cancel(batch.id)
        await client.close()


async def test_cli_batch_runs_a_file_with_a_progress_bar(redis_server, tmp_path):
    async with fake_stack(redis_server.url) as stack:
        source = tmp_path / "questions.jsonl"
        source.write_bytes(jsonl([chat_line(i) for i in range(5)] + [chat_line(5, model="nowhere:1b")]))
        code, out = await run_cli(stack.base_url, "batch", str(source))
        assert code == 0, out
        assert "6 requests" in out and "completed: 5 completed, 1 failed" in out and "6/6" in out
        output = [json.loads(x) for x in (tmp_path / "questions.output.jsonl").read_text().splitlines()]
        errors = [json.loads(x) for x in (tmp_path / "questions.errors.jsonl").read_text().splitlines()]
        assert [x["custom_id"] for x in output] == [f"req-{i}" for i in range(5)]
        assert [x["custom_id"] for x in errors] == ["req-5"]
        code, out = await run_cli(stack.base_url, "batch", str(tmp_path / "missing.jsonl"))
        assert code == 1 and "no such file" in out


async def test_a_line_whose_worker_died_fails_and_is_counted_once(redis_server):
    engine = FakeEngine(answer_tokens=500, step_s=0.02)  # 10 s a line: dead-worker checks come every 5 s
    async with fake_stack(redis_server.url, engine=engine) as stack:
        client = client_for(stack)
        batch = await start_batch(client, [chat_line(0, max_tokens=500)])
        await async_wait_until(lambda: _started(engine), 5, "the line to start")
        # As if its worker had died: the record names a worker with no heartbeat.
        job_id = engine.started[0]
        record = json.loads(await stack.redis.get(keys.job_record(job_id)))
        await stack.redis.set(keys.job_record(job_id), json.dumps({**record, "worker_id": "gone"}))
        done = (await finished(client, batch.id, timeout_s=8))[-1]
        assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (0, 1)
        [line] = [json.loads(x) for x in (await client.files.content(done.error_file_id)).text.splitlines()]
        assert line["response"]["status_code"] == 500 and "stopped responding" in \
            line["response"]["body"]["error"]["message"]
        await async_wait_until(lambda: _true(engine.in_flight() == 0), 15, "the real job to end")
        again = await client.batches.retrieve(batch.id)
        assert (again.request_counts.completed, again.request_counts.failed) == (0, 1)  # not counted twice
        await client.close()


async def _started(engine) -> bool:
    return bool(engine.started)


async def _true(value) -> bool:
    return bool(value)


async def test_a_batch_past_its_window_expires(redis_server):
    engine = FakeEngine(answer_tokens=20, step_s=0.02)
    async with fake_stack(redis_server.url, engine=engine, max_jobs=2, batch_share=0.5) as stack:
        client = client_for(stack)
        rows = [chat_line(i, max_tokens=20) for i in range(10)]
        batch = await start_batch(client, rows)
        await async_wait_until(lambda: _some_done(client, batch.id), 20, "a few lines to finish")
        record = json.loads(await stack.redis.get(keys.batch(batch.id)))  # as if 24 h had passed
        await stack.redis.set(keys.batch(batch.id), json.dumps({**record, "expires_at": record["created_at"] - 1}))
        done = (await finished(client, batch.id))[-1]
        assert done.status == "expired" and done.expired_at
        ok = [json.loads(x)["custom_id"] for x in (await client.files.content(done.output_file_id)).text.splitlines()]
        late = [json.loads(x) for x in (await client.files.content(done.error_file_id)).text.splitlines()]
        assert len(ok) + len(late) == 10 and all(x["error"]["code"] == "batch_expired" for x in late)
        assert "expiring" not in done.model_dump() and len(engine.started) < 10
        await client.close()


async def test_a_line_arq_ended_without_running_it_is_settled(redis_server, tmp_path):
    """An abort that reaches arq just as a worker takes a job ends it "before start": our code
    never runs, so the batch settles the line itself instead of waiting for it forever."""
    write_model(tmp_path, MODEL)
    async with fake_stack(redis_server.url, worker=False, pull_worker=True, home=tmp_path) as stack:
        client = client_for(stack)
        await async_wait_until(lambda: _listed(stack), 10, f"{MODEL} in the catalog")
        batch = await start_batch(client, [chat_line(i) for i in range(3)])
        [first, *_] = json.loads(await stack.redis.get(keys.batch_lines(batch.id)))
        # What arq leaves after "aborted before start": a result, the job out of its queue.
        await stack.redis.set(result_key_prefix + first["job_id"], b"{}")
        await stack.redis.zrem(keys.batch_queue(MODEL), first["job_id"])
        await async_wait_until(lambda: _failed(client, batch.id, 1), 10, "the line to be settled")
        await client.batches.cancel(batch.id)
        done = (await finished(client, batch.id))[-1]
        cancelled = [json.loads(x) for x in (await client.files.content(done.error_file_id)).text.splitlines()]
        assert done.status == "cancelled" and [x["custom_id"] for x in cancelled] == ["req-0", "req-1", "req-2"]
        await client.close()


async def _listed(stack) -> bool:
    async with stack.client() as http:
        return MODEL in {m["name"] for m in (await http.get("/api/tags")).json()["models"]}


async def _failed(client, batch_id: str, n: int) -> bool:
    return (await client.batches.retrieve(batch_id)).request_counts.failed == n


async def test_creating_a_big_batch_leaves_the_api_answering(redis_server):
    """While 20,000 lines are turned into jobs, chats keep being answered: not only while the
    lines are sent to Redis, but while they are parsed and checked, the part that used to hold
    the event loop for seconds. A chat counts when, both before it was sent and after its
    answer came, the batch's record was saved and its lines' list not yet written."""
    async with fake_stack(redis_server.url, engine=FakeEngine(answer_tokens=2)) as stack:
        client = client_for(stack)
        rows = [chat_line(i, max_tokens=2) for i in range(20_000)]
        f = await client.files.create(file=("big.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")

        async def preparing() -> bool:
            ids = await stack.redis.zrange(keys.BATCHES, 0, -1)
            return bool(ids) and not await stack.redis.exists(keys.batch_lines(ids[0].decode()))

        create = asyncio.create_task(client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                           completion_window="24h"))
        answered = answered_while_preparing = 0
        while not create.done():
            before = await preparing()
            chat = await client.chat.completions.create(model=MODEL, max_tokens=2,
                                                        messages=[{"role": "user", "content": "hi"}])
            assert chat.choices[0].message.content
            answered += 1
            answered_while_preparing += before and await preparing()
        batch = await create
        assert batch.status == "in_progress" and batch.request_counts.total == 20_000
        assert answered_while_preparing >= 3, (answered, answered_while_preparing)
        await client.close()
