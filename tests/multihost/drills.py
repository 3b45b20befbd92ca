"""What the multi-host fault drills share: where each client's job runs, waiting on streams and
on conditions with a measured time, counting executions, submitting async jobs."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx

from tests.multihost.clients import (
    Stream,
    job_index,
    starts_by_worker,
)
from tests.multihost.cluster import FAKE_MODEL, Cluster

ENDED = ("done", "failed", "cancelled")


async def placed(redis, labels: list[str], workers: dict[str, str], timeout_s: float = 30) -> dict[str, str]:
    """Label -> host of the worker running it, once every label's job is running."""
    deadline = time.monotonic() + timeout_s
    while True:
        index = await job_index(redis)
        where = {label: host_of(index, label, workers) for label in labels
                 if (index.get(label, {}).get("record") or {}).get("status") == "running"}
        if len(where) == len(labels):
            return where
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(where)} of {len(labels)} jobs running after {timeout_s}s: {where}")
        await asyncio.sleep(0.2)


def host_of(index: dict[str, dict], label: str, workers: dict[str, str]) -> str | None:
    record = (index.get(label) or {}).get("record") or {}
    return {wid: host for host, wid in workers.items()}.get(record.get("worker_id", ""), record.get("worker_id"))


async def first_tokens(streams: list[Stream], timeout_s: float = 30) -> None:
    await asyncio.wait_for(asyncio.gather(*(s.first_token.wait() for s in streams)), timeout_s)


async def wait_streams(streams: list[Stream], timeout_s: float) -> None:
    """Wait for the streams to end, at most ``timeout_s``; one still open then is stopped and
    keeps ``end == "open"`` (no final line), which the test's assertions then report."""
    pending = [s.task for s in streams if s.task is not None and not s.task.done()]
    if pending:
        _, still = await asyncio.wait(pending, timeout=timeout_s)
        for task in still:
            task.cancel()
        await asyncio.gather(*still, return_exceptions=True)


def executions(cluster: Cluster) -> Counter[str]:
    """Job id -> how many times any worker started it (from the workers' logs)."""
    logs = {h: cluster.services[f"worker@{h}"].log_path for h in cluster.worker_hosts}
    return Counter(j for ids in starts_by_worker(logs).values() for j in ids)


def problems_of(streams: list[Stream]) -> dict[str, str]:
    return {s.label: p for s in streams if (p := s.duplicate_problem())}


async def until(predicate, timeout_s: float, interval_s: float = 0.25) -> float | None:
    """Seconds until ``await predicate()`` is true, or None if it never was within ``timeout_s``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if await predicate():
                return time.monotonic() - start
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
        await asyncio.sleep(interval_s)
    return None


async def submit_async(http: httpx.AsyncClient, labels: list[str], num_predict: int,
                       concurrency: int = 16) -> dict[str, str]:
    """POST /api/jobs/generate for each label; label -> job id of those accepted (202)."""
    accepted: dict[str, str] = {}
    gate = asyncio.Semaphore(concurrency)

    async def one(label: str) -> None:
        async with gate:
            try:
                r = await http.post("/api/jobs/generate", json={
                    "model": FAKE_MODEL, "prompt": label, "options": {"num_predict": num_predict}}, timeout=60)
            except httpx.HTTPError:
                return
            if r.status_code == 202:
                accepted[label] = r.json()["id"]

    await asyncio.gather(*(one(label) for label in labels))
    return accepted
