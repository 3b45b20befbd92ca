"""Routing across hosts (api/routing.py): a burst of async jobs spreads over the workers of
two hosts by load, and chats that share a long system prompt all go to the worker that ran it
first, whose (fake) engine then finds the prompt in its prefix cache, as /metrics shows."""

from __future__ import annotations

import re
from collections import Counter

import httpx
import pytest

from tests.multihost.clients import job_records
from tests.multihost.drills import ENDED, submit_async, until
from tests.multihost.figures import report

pytestmark = pytest.mark.multihost

FAKE_MODEL = "fake:test"
SYSTEM = "You are a careful assistant who answers briefly. " * 40  # about 2,000 characters


async def _all_ended(redis, ids: list[str]) -> list[dict]:
    async def ended() -> bool:
        records = await job_records(redis, ids)
        return all(r is not None and r["status"] in ENDED for r in records.values())

    assert await until(ended, 120, 0.1) is not None, "the jobs did not all end within 2 minutes"
    records = await job_records(redis, ids)
    return [records[i] for i in ids]


def _cache_hits(metrics: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(
        r'vllama_prefix_cache_hits_total\{worker="([^"]+)",model="[^"]+"\} (\d+)', metrics)}


async def test_bursts_spread_by_load_and_shared_prefixes_follow_their_cache(make_cluster, redis_of):
    cluster = make_cluster(worker_env={"VLLAMA_MAX_JOBS": "32", "VLLAMA_BATCH_SHARE": "1"})
    redis = redis_of(cluster)
    workers = set(cluster.ready_workers().values())
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=60) as http:
        await http.get("/api/ps")
        accepted = await submit_async(http, [f"job-{i}" for i in range(48)], num_predict=50, concurrency=48)
        assert len(accepted) == 48
        records = await _all_ended(redis, list(accepted.values()))
        ran = Counter(r["worker_id"] for r in records)
        assert set(ran) == workers and max(ran.values()) <= 1.5 * min(ran.values()), ran

        ids = []
        for i in range(8):
            r = await http.post("/api/jobs/chat", json={"model": FAKE_MODEL, "options": {"num_predict": 5},
                                                        "messages": [{"role": "system", "content": SYSTEM},
                                                                     {"role": "user", "content": f"question {i}"}]})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
            await _all_ended(redis, ids[-1:])  # one after another, as a user's chats come
        chats = [(await job_records(redis, ids))[i] for i in ids]
        home = chats[0]["worker_id"]
        assert [c["worker_id"] for c in chats] == [home] * 8
        assert [c["route"]["reason"] for c in chats[1:]] == ["affinity"] * 7
        least = 7 * (len(SYSTEM) // 16 - 1) * 16  # the shared prompt's whole blocks, seven times

        async def hits_shown() -> bool:
            return _cache_hits((await http.get("/metrics")).text).get(home, 0) >= least

        assert await until(hits_shown, 10, 0.2) is not None, "the chats' cache hits never reached /metrics"
        hits = _cache_hits((await http.get("/metrics")).text)
    report("routing across two hosts", burst_48_jobs_per_worker=dict(ran), prefix_cache_hit_tokens=hits)
