"""Routing through real vLLM (api/routing.py): with two workers serving the bundled model,
chats that share a long system prompt go to the worker that ran it first, and that worker's
vLLM finds the prompt in its prefix cache (its own counters, through /metrics)."""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import MODEL, start_worker, wait_ready
from tests.harness import wait_until

pytestmark = pytest.mark.e2e

SYSTEM = ("You are a meticulous assistant for a small bakery. You know every recipe, every price and every "
          "opening hour, and you answer in one short sentence. ") * 24  # about 800 tokens


@pytest.fixture(scope="module")
def second_worker(stack):
    worker = start_worker(stack.redis_url, stack.logs / "worker-2.log", **stack.env)
    try:
        wait_ready(stack.base_url, worker, n_workers=2)
        yield worker
    finally:
        worker.stop()


def cache_hits(text: str) -> dict[str, int]:
    return {m.group(1): int(float(m.group(2))) for m in re.finditer(
        rf'vllama_prefix_cache_hits_total\{{worker="([^"]+)",model="{re.escape(MODEL)}"\}} (\S+)', text)}


def test_chats_sharing_a_system_prompt_go_where_vllm_caches_it(http, second_worker):
    before = cache_hits(http.get("/metrics").text)
    routes = []
    for question in ("When do you open?", "How much is a baguette?", "Do you sell rye bread?"):
        r = http.post("/api/jobs/chat", json={"model": MODEL, "options": {"num_predict": 4, "temperature": 0},
                                              "messages": [{"role": "system", "content": SYSTEM},
                                                           {"role": "user", "content": question}]})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        wait_until(lambda: http.get(f"/api/jobs/{job_id}").json()["status"] == "done", 120, "the chat to be done")
        routes.append(http.get(f"/api/jobs/{job_id}").json())
    home = routes[0]["worker_id"]
    assert [r["worker_id"] for r in routes] == [home] * 3
    assert [r["route"]["reason"] for r in routes[1:]] == ["affinity", "affinity"]

    def hits_grew() -> bool:
        return cache_hits(http.get("/metrics").text).get(home, 0) - before.get(home, 0) >= 2 * 512

    # The next two found the ~800-token system prompt in vLLM's cache: its whole blocks (128
    # tokens each on CPU, 16 on a GPU), at least 512 tokens each time.
    wait_until(hits_grew, 10, "vLLM's prefix-cache hits of the chats' worker to show in /metrics")
