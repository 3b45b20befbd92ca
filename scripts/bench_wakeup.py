"""How long a queued job waits for a worker to take it, and what an idle worker costs.

Starts a private Redis and one real worker process (``VLLAMA_ENGINE=fake vllama worker``),
then, from this process:
- idle CPU: the worker's user+system time over --idle-s seconds with nothing to do, read
  from /proc/<pid>/stat;
- enqueue-to-start latency: --jobs jobs, one at a time at random moments, each enqueued
  straight into the model's queue (interactive, then batch); the latency is from just before
  the enqueue until the job's first frame (the worker's start frame) reaches a subscriber
  here, by this process's monotonic clock, so no two clocks are compared;
- abort latency: --jobs/6 running async jobs aborted at random moments; from just before
  the abort until the worker's record says cancelled (read every millisecond);
- a burst: --burst jobs enqueued in one round trip; how long until all have started.

    .venv/bin/python scripts/bench_wakeup.py [--jobs 300] [--idle-s 30] [--burst 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.embedded_redis import EmbeddedRedis  # noqa: E402
from common import clock, keys, registry  # noqa: E402
from common.job_queue import JobQueue  # noqa: E402
from common.protocol import GenerationJob, Sampling  # noqa: E402
from common.redis_conn import connect  # noqa: E402

MODEL = "fake:bench"
TICK_HZ = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK_HZ


def job(priority: str, tokens: int = 1, stream: bool = True) -> GenerationJob:
    return GenerationJob(job_id=uuid.uuid4().hex, model=MODEL, kind="generate", prompt="hi", priority=priority,
                         stream=stream, sampling=Sampling(max_tokens=tokens))


async def until_ended(pubsub, started: float | None = None) -> float:
    """Read the job's frames to its end; returns when its first frame arrived."""
    first = None
    while True:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30)
        if message is None:
            raise RuntimeError("no frame within 30 s: is the worker taking jobs?")
        if first is None:
            first = time.perf_counter()
        if json.loads(message["data"]).get("type") in ("done", "error"):
            return first


async def latencies(redis, queue: JobQueue, priority: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        j = job(priority)
        pubsub = redis.pubsub()
        await pubsub.subscribe(keys.frames_channel(j.job_id))
        await pubsub.get_message(timeout=5)  # the subscription's confirmation
        await asyncio.sleep(random.uniform(0, 0.1))  # a random moment of the worker's poll cycle
        sent = time.perf_counter()
        await queue.enqueue(j, limit=10_000)
        out.append(await until_ended(pubsub) - sent)
        await pubsub.aclose()
    return out


async def abort_latencies(redis, queue: JobQueue, n: int) -> list[float]:
    out = []
    for _ in range(n):
        j = job("interactive", tokens=10**6, stream=False)  # no listener to lose: only the abort stops it
        pubsub = redis.pubsub()
        await pubsub.subscribe(keys.frames_channel(j.job_id))
        await pubsub.get_message(timeout=5)
        await queue.enqueue(j, limit=10_000)
        if await pubsub.get_message(ignore_subscribe_messages=True, timeout=30) is None:
            raise RuntimeError("the job did not start within 30 s")
        await pubsub.aclose()
        await asyncio.sleep(random.uniform(0, 0.1))
        sent = time.perf_counter()
        await queue.abort(j.job_id)
        while (record := await queue.record(j.job_id)) is None or record.status != "cancelled":
            if time.perf_counter() - sent > 30:
                raise RuntimeError("the job was not cancelled within 30 s")
            await asyncio.sleep(0.001)
        out.append(time.perf_counter() - sent)
    return out


async def burst(redis, queue: JobQueue, n: int) -> float:
    jobs = [job("interactive") for _ in range(n)]
    pubsub = redis.pubsub()
    await pubsub.subscribe(*[keys.frames_channel(j.job_id) for j in jobs])
    for _ in jobs:
        await pubsub.get_message(timeout=5)
    sent = time.perf_counter()
    problems = await queue.enqueue_many([queue.prepare(j, 10_000) for j in jobs])
    assert not any(problems), problems
    started: set[str] = set()
    last = sent
    while len(started) < n:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30)
        if message is None:
            raise RuntimeError(f"only {len(started)} of {n} jobs started within 30 s")
        channel = message["channel"].decode()
        if channel not in started:
            started.add(channel)
            last = time.perf_counter()
    await pubsub.aclose()
    return last - sent


def summary(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (f"{name}: n={len(ms)} median {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms, "
            f"max {ms[-1]:.2f} ms")


async def main(args: argparse.Namespace) -> None:
    server = EmbeddedRedis().start()
    env = {**os.environ, "VLLAMA_REDIS_URL": server.url, "VLLAMA_ENGINE": "fake", "VLLAMA_MODEL": MODEL,
           "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis = await connect(server.url)
    try:
        await clock.sync(redis)
        deadline = time.monotonic() + 60
        while not any(w.state == "ready" for w in await registry.live_workers(redis)):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError("the worker did not get ready within 60 s")
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # start-up work settles

        before = cpu_s(worker.pid)
        await asyncio.sleep(args.idle_s)
        used = cpu_s(worker.pid) - before
        print(f"idle worker: {used:.2f} CPU s in {args.idle_s:.0f} s = {100 * used / args.idle_s:.2f}% of a core")

        queue = JobQueue(redis, keep_result_s=60)
        await latencies(redis, queue, "interactive", 10)  # warm up
        print(summary("enqueue-to-start, interactive queue", await latencies(redis, queue, "interactive", args.jobs)))
        print(summary("enqueue-to-start, batch queue", await latencies(redis, queue, "batch", args.jobs // 3)))
        print(summary("abort-to-cancelled", await abort_latencies(redis, queue, args.jobs // 6)))
        print(f"burst of {args.burst} jobs in one round trip: all started after "
              f"{1000 * await burst(redis, queue, args.burst):.1f} ms")
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        await redis.aclose()
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--burst", type=int, default=64)
    asyncio.run(main(parser.parse_args()))
