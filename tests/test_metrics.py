"""GET /metrics through the real stack with the fake engine: the numbers follow what was
served, and the text parses as Prometheus's format (with Prometheus's own parser)."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until
from workers.fake_engine import FakeEngine


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels) -> float:
    return found[(name, frozenset(labels.items()))]


async def test_metrics_follow_what_was_served(redis_server):
    engine = FakeEngine(answer_tokens=1000, step_s=0.002)  # 5 tokens when asked for 5; 2 s otherwise
    async with fake_stack(redis_server.url, engine=engine, max_jobs=2, batch_share=0.5) as stack, \
            stack.client() as http:
        for _ in range(3):
            r = await http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False,
                                                       "options": {"num_predict": 5}})
            assert r.status_code == 200
        assert (await http.post("/api/generate", json={"model": "nowhere:1b", "prompt": "x"})).status_code == 404
        worker = stack.worker.worker_id

        async def counted() -> bool:  # the heartbeat carries the worker's numbers
            found = samples((await http.get("/metrics")).text)
            return found.get(("vllama_jobs_total", frozenset({"worker": worker, "model": MODEL,
                                                              "status": "done"}.items()))) == 3
        await async_wait_until(counted, 5, "three jobs counted")

        r = await http.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        found = samples(r.text)
        assert value(found, "vllama_http_requests_total", method="POST", endpoint="/api/generate", status="200") == 3
        assert value(found, "vllama_http_requests_total", method="POST", endpoint="/api/generate", status="404") == 1
        assert value(found, "vllama_workers_alive") == 1
        assert value(found, "vllama_generated_tokens_total", worker=worker, model=MODEL) == 15
        assert value(found, "vllama_time_to_first_token_seconds_count", worker=worker, model=MODEL) == 3
        assert value(found, "vllama_time_per_output_token_seconds_bucket", worker=worker, model=MODEL, le="+Inf") == 3
        assert value(found, "vllama_job_slots", worker=worker, model=MODEL) == 2
        assert value(found, "vllama_queue_jobs", model=MODEL, **{"class": "batch"}) == 0

        # A backlog of batch jobs shows in the batch queue's gauge, and running jobs per worker.
        for i in range(5):
            await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": str(i)})
        await asyncio.sleep(0.5)
        found = samples((await http.get("/metrics")).text)
        assert value(found, "vllama_queue_jobs", model=MODEL, **{"class": "batch"}) == 5
        await async_wait_until(lambda: _running(http, worker), 5, "one batch job running (its share of two slots)")


async def _running(http, worker: str) -> bool:
    found = samples((await http.get("/metrics")).text)
    return value(found, "vllama_jobs_running", worker=worker, model=MODEL) == 1
