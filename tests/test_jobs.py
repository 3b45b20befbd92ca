"""The jobs API and batch-class work, over real Redis and HTTP with the fake engine: submit,
poll (partial output, result), attach to the stream mid-way, cancel, list, a job that waits
for a worker, expiry, and interactive requests served before a backlog of batch jobs.
tests/e2e runs an async job through real vLLM."""

from __future__ import annotations

import asyncio
import json

from common import keys
from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until
from tests.model_factory import write_model
from workers.fake_engine import FakeEngine


async def wait_status(http, job_id: str, *statuses: str, timeout_s: float = 10) -> dict:
    found: dict = {}

    async def reached() -> bool:
        found.update((await http.get(f"/api/jobs/{job_id}")).json())
        return found.get("status") in statuses

    await async_wait_until(reached, timeout_s, f"job {job_id} to be {' or '.join(statuses)}")
    return found


async def test_submit_poll_and_get_the_result_sync_would_give(redis_server):
    async with fake_stack(redis_server.url, engine=FakeEngine(step_s=0.05)) as stack, stack.client() as http:
        r = await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": "hi", "options": {"num_predict": 8}})
        assert r.status_code == 202
        job = r.json()
        assert job["status"] == "queued" and job["type"] == "generate" and job["priority"] == "batch"

        running = await wait_status(http, job["id"], "running")
        assert running["worker_id"] == stack.worker.worker_id and running["started_at"]
        await async_wait_until(lambda: _has_output(http, job["id"]), 5, "partial output")
        partial = (await http.get(f"/api/jobs/{job['id']}")).json()
        assert partial["status"] == "running" and "tok0 " in partial["output"] and "result" not in partial

        done = await wait_status(http, job["id"], "done")
        assert done["output"] == "".join(f"tok{i} " for i in range(8)) and done["finished_at"]
        result = done["result"]
        assert result["done"] and result["response"] == done["output"] and result["eval_count"] == 8
        sync = (await http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False,
                                                        "options": {"num_predict": 8}})).json()
        assert set(result) == set(sync) and result["response"] == sync["response"]

        chat = (await http.post("/api/jobs/chat", json={"model": MODEL, "priority": "interactive",
                                                         "messages": [{"role": "user", "content": "x"}],
                                                         "options": {"num_predict": 2}})).json()
        assert chat["priority"] == "interactive"
        done = await wait_status(http, chat["id"], "done")
        assert done["result"]["message"] == {"role": "assistant", "content": "tok0 tok1 "}


async def _listed(http) -> bool:
    return MODEL in {m["name"] for m in (await http.get("/api/tags")).json()["models"]}


async def _has_output(http, job_id: str) -> bool:
    return bool((await http.get(f"/api/jobs/{job_id}")).json().get("output"))


async def test_attach_mid_way_gets_the_whole_answer_once(redis_server):
    async with fake_stack(redis_server.url, engine=FakeEngine(step_s=0.05)) as stack, stack.client() as http:
        job = (await http.post("/api/jobs/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                       "options": {"num_predict": 12}})).json()
        await async_wait_until(lambda: _has_output(http, job["id"]), 5, "partial output")
        r = await http.get(f"/api/jobs/{job['id']}/stream")
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert "".join(line["message"]["content"] for line in lines) == "".join(f"tok{i} " for i in range(12))
        assert lines[-1]["done"] and lines[-1]["eval_count"] == 12 and not any(line["done"] for line in lines[:-1])
        # After the end too: the kept frames replay the whole answer.
        again = (await http.get(f"/api/jobs/{job['id']}/stream")).text
        assert [json.loads(x)["message"]["content"] for x in again.splitlines()] == \
            [line["message"]["content"] for line in lines]


async def test_cancel_queued_and_running_jobs(redis_server):
    engine = FakeEngine(answer_tokens=10_000, step_s=0.02)
    async with fake_stack(redis_server.url, engine=engine, max_jobs=1) as stack, stack.client() as http:
        body = {"model": MODEL, "prompt": "long", "priority": "interactive"}
        running = (await http.post("/api/jobs/generate", json=body)).json()
        queued = (await http.post("/api/jobs/generate", json=body)).json()
        await wait_status(http, running["id"], "running")

        r = await http.delete(f"/api/jobs/{queued['id']}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert await stack.redis.zscore(keys.generation_queue(MODEL), queued["id"]) is None
        r = await http.delete(f"/api/jobs/{running['id']}")
        assert r.status_code == 200
        cancelled = await wait_status(http, running["id"], "cancelled")
        assert cancelled["error"] == "cancelled"
        await async_wait_until(lambda: _true(engine.in_flight() == 0), 5, "the engine request to be aborted")
        assert queued["id"] not in engine.started

        r = await http.delete(f"/api/jobs/{running['id']}")
        assert r.status_code == 409 and "already cancelled" in r.json()["error"]
        stream = await http.get(f"/api/jobs/{running['id']}/stream")
        assert json.loads(stream.text.splitlines()[-1])["error"].startswith(f"job '{running['id']}' was cancelled")
        r = await http.get("/api/jobs/no-such-job")
        assert r.status_code == 404 and "VLLAMA_KEEP_RESULT_S" in r.json()["error"]


async def test_list_recent_jobs(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        ids = [(await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": str(i),
                                                            "options": {"num_predict": 1}})).json()["id"]
               for i in range(3)]
        for job_id in ids:
            await wait_status(http, job_id, "done")
        listed = (await http.get("/api/jobs")).json()["jobs"]
        assert [j["id"] for j in listed] == ids[::-1]
        assert [j["id"] for j in (await http.get("/api/jobs?limit=2")).json()["jobs"]] == ids[:0:-1]
        assert (await http.get("/api/jobs?status=running")).json()["jobs"] == []


async def test_a_job_submitted_with_no_worker_runs_when_one_starts(redis_server, tmp_path):
    write_model(tmp_path, MODEL)  # on disk (a store is up), but no worker is
    async with fake_stack(redis_server.url, worker=False, pull_worker=True, home=tmp_path) as api_only, \
            api_only.client() as http:
        await async_wait_until(lambda: _listed(http), 10, f"{MODEL} in the catalog")
        job = (await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": "hi",
                                                           "options": {"num_predict": 3}})).json()
        await asyncio.sleep(0.5)
        assert (await http.get(f"/api/jobs/{job['id']}")).json()["status"] == "queued"
        async with fake_stack(redis_server.url, flush=False):
            done = await wait_status(http, job["id"], "done")
        assert done["output"] == "tok0 tok1 tok2 "


async def test_records_and_frames_expire(redis_server):
    async with fake_stack(redis_server.url, keep_result_s=1) as stack, stack.client() as http:
        job = (await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": "hi",
                                                           "options": {"num_predict": 2}})).json()
        await wait_status(http, job["id"], "done")
        assert await stack.redis.ttl(keys.job_frames(job["id"])) > 0
        await asyncio.sleep(2.2)
        assert (await http.get(f"/api/jobs/{job['id']}")).status_code == 404
        assert not await stack.redis.exists(keys.job_frames(job["id"]))


async def test_interactive_requests_do_not_wait_behind_batch_jobs(redis_server):
    """Batch jobs fill only their share of the worker's slots: a chat sent during a backlog of
    batch work starts at once, not after it."""
    engine = FakeEngine(answer_tokens=40, step_s=0.01)  # 0.4 s a job
    async with fake_stack(redis_server.url, engine=engine, max_jobs=4, batch_share=0.5) as stack, \
            stack.client() as http:
        for i in range(20):  # 20 jobs, 2 at a time: ~4 s of batch work
            await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": str(i)})
        await asyncio.sleep(0.2)
        async with http.stream("POST", "/api/chat", json={
                "model": MODEL, "messages": [{"role": "user", "content": "now"}]}) as r:
            first = json.loads(await anext(r.aiter_lines()))
            # The chat is answering while most of the batch still waits (~4 s of it).
            assert first["message"]["content"] == "tok0 "
            assert await stack.redis.zcard(keys.batch_queue(MODEL)) > 10


async def _true(value) -> bool:
    return bool(value)
