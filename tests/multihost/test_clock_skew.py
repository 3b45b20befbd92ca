"""Clocks that disagree: a worker host whose wall clock is 30 s ahead or behind changes
nothing; liveness is judged by Redis and cross-host times are cluster time."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest

from tests.multihost.clients import (
    JobWatcher,
    Stream,
    stream_generate,
)
from tests.multihost.cluster import FAKE_MODEL
from tests.multihost.drills import (
    ENDED,
    host_of,
    problems_of,
    submit_async,
    until,
)
from tests.multihost.figures import report

pytestmark = pytest.mark.multihost


@pytest.mark.parametrize(("host", "offset"), [("w1", "+30s"), ("w2", "-30s")], ids=["ahead", "behind"])
async def test_clock_skew_30s_nothing_is_declared_dead(make_cluster, redis_of, host: str, offset: str):
    """One worker host's wall clock is 30 s off (the API's and Redis's are right). Liveness and
    routing must not depend on clocks agreeing: both workers stay listed, both serve, and the
    times users see (Ollama's durations, async jobs' timestamps) stay consistent."""
    cluster = make_cluster(clocks={host: offset}, worker_env={"VLLAMA_MAX_JOBS": "4"}, wait_workers=1,
                           store_models={"w1": ["stored:w1"], "w2": ["stored:w2"]})
    redis = redis_of(cluster)
    samples: list[dict] = []
    streams: list[Stream] = []
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=None) as http, JobWatcher(redis) as watcher:
        both_listed_s = await until(lambda: _both_ready(http), 20)  # the normal start-up time, then observe
        workers = cluster.ready_workers()
        observe_until = time.monotonic() + 15  # three heartbeat TTLs

        async def sample() -> None:
            while time.monotonic() < observe_until:
                health = (await http.get("/health", timeout=5)).json()
                ps = (await http.get("/api/ps", timeout=5)).json()
                tags = (await http.get("/api/tags", timeout=5)).json()
                samples.append({
                    "health": sorted(w["host"] for w in health.get("workers", []) if w["state"] == "ready"),
                    "ps": sorted(w["host"] for m in ps.get("models", []) if m["name"] == FAKE_MODEL
                                 for w in m.get("workers", [])),
                    "tags": sorted(m["name"] for m in tags.get("models", [])),
                })
                await asyncio.sleep(0.5)

        async def load() -> None:
            # 8 at once with 4 slots per worker: each burst needs both workers.
            for attempt in range(3):
                burst = await asyncio.gather(*(stream_generate(http, f"skew-{attempt}-{i}", 100, stop_after_s=60)
                                               for i in range(8)))
                streams.extend(burst)
                await asyncio.sleep(1)

        await asyncio.gather(sample(), load())
        accepted = await submit_async(http, [f"skew-async-{i}" for i in range(8)], 100)
        await until(lambda: _async_ended(http, accepted.values()), 60, 0.5)
        async_jobs = [(await http.get(f"/api/jobs/{j}", timeout=10)).json() | {"read_at": time.time()}
                      for j in accepted.values()]
        index = await watcher.index()
    served_by = Counter(host_of(index, s.label, workers) or "?" for s in streams)
    by_id = {wid: h for h, wid in workers.items()}
    both = ["w1", "w2"]
    missing = {what: sum(1 for x in samples if x[what] != both) for what in ("health", "ps")}
    missing["tags"] = sum(1 for x in samples if x["tags"] != ["stored:w1", "stored:w2"])
    bad_durations = {s.label: _duration_problem(s) for s in streams if _duration_problem(s)}
    bad_times = {j["id"]: f"on {by_id.get(j.get('worker_id'), j.get('worker_id'))}: {_timestamps_problem(j)}"
                 for j in async_jobs if _timestamps_problem(j)}
    report(f"clock_skew_{host}_{offset}", both_listed_after_s=both_listed_s, samples=len(samples),
           samples_missing_a_worker=missing, served_by=dict(served_by), ends=dict(Counter(s.end for s in streams)),
           async_served_by=dict(Counter(by_id.get(j.get("worker_id"), "?") for j in async_jobs)),
           wrong_total_duration=len(bad_durations), wrong_job_timestamps=len(bad_times),
           sample_duration_problem=next(iter(bad_durations.values()), None),
           sample_timestamp_problem=next(iter(bad_times.items()), None))

    failures = []
    if not samples or missing != {"health": 0, "ps": 0, "tags": 0}:
        failures.append(f"/health, /api/ps and /api/tags must list both hosts in every sample; samples "
                        f"missing one: {missing} of {len(samples)} (first: {samples[:1]})")
    if not all(s.end == "done" for s in streams):
        failures.append(f"requests failed: {Counter(s.end for s in streams)}")
    if set(served_by) != {"w1", "w2"}:
        failures.append(f"both workers must serve (8 concurrent requests, 4 slots each): {dict(served_by)}")
    if problems_of(streams):
        failures.append(f"tokens repeated or lost: {problems_of(streams)}")
    if bad_durations:
        failures.append(f"Ollama's durations of {len(bad_durations)} answers are wrong, e.g. "
                        f"{next(iter(bad_durations.items()))}")
    if bad_times:
        failures.append(f"timestamps of {len(bad_times)} async jobs out of order, e.g. {next(iter(bad_times.values()))}")
    assert not failures, f"with {host}'s clock {offset}:\n" + "\n".join(failures)


def _duration_problem(s: Stream) -> str | None:
    """total_duration must lie between eval_duration and what the client itself waited."""
    final = s.final or {}
    if not final.get("done") or s.ended_at is None:
        return None
    total = final.get("total_duration", 0) / 1e9
    waited = s.ended_at - s.started_at
    if not (final.get("eval_duration", 0) / 1e9 <= total <= waited + 1.0):
        return f"total_duration {total:.2f} s, eval_duration {final.get('eval_duration', 0) / 1e9:.2f} s, " \
               f"the client waited {waited:.2f} s"
    return None


def _timestamps_problem(job: dict) -> str | None:
    """created_at <= started_at <= finished_at <= when it was read (a second's slack), as one
    clock would have them."""
    from datetime import UTC, datetime

    def t(key: str) -> float | None:
        v = job.get(key)
        return None if v is None else datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()

    created, started, finished = t("created_at"), t("started_at"), t("finished_at")
    if None in (created, started, finished) or not (created - 1 <= started <= finished + 1 <= job["read_at"] + 2):
        return f"created_at {job.get('created_at')}, started_at {job.get('started_at')}, " \
               f"finished_at {job.get('finished_at')}, read at {datetime.fromtimestamp(job['read_at'], UTC).isoformat()}"
    return None


async def _async_ended(http: httpx.AsyncClient, ids) -> bool:
    for job_id in ids:
        if (await http.get(f"/api/jobs/{job_id}", timeout=10)).json()["status"] not in ENDED:
            return False
    return True


async def _both_ready(http: httpx.AsyncClient) -> bool:
    r = await http.get("/health", timeout=3)
    return len([w for w in r.json().get("workers", []) if w["state"] == "ready"]) == 2
