"""`vllama bench`: what the stack costs compared with calling vLLM directly.

One run, same model, same prompts, same greedy settings, two ways:
  engine  vLLM's AsyncLLM in this process, requests submitted straight to it;
  stack   HTTP -> API -> Redis/arq -> worker (the same engine) -> pub/sub -> API -> HTTP,
          with redis-server, `vllama worker` and `vllama api` started as separate processes.
At each concurrency level it keeps that many requests in flight and reports output tokens
per second and the median time to first token, then the stack/engine ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "What is a hash table?",
    "Give three tips for learning to cook.",
    "Describe a cat to someone who has never seen one.",
    "Why do leaves change color in autumn?",
    "Summarize the plot of a detective story.",
    "How does a bicycle stay upright?",
]


REPEATS = 3


@dataclass
class Sample:
    ttft_s: float
    tokens: int


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    ttft_median_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


async def run_level(one: Callable[[int], Awaitable[Sample]], concurrency: int, requests: int) -> LevelResult:
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> Sample:
        async with gate:
            return await one(i)

    start = time.perf_counter()
    samples = await asyncio.gather(*(gated(i) for i in range(requests)))
    wall = time.perf_counter() - start
    return LevelResult(concurrency, requests, sum(s.tokens for s in samples), wall,
                       statistics.median(s.ttft_s for s in samples) * 1000)


async def measure(one, levels: list[int], per_level, label: str) -> list[LevelResult]:
    """Warm up at the highest level (so every batch shape has been seen), then run each level
    REPEATS times and keep the median run by throughput: two cores make single runs noisy."""
    from tqdm import tqdm

    top = max(levels)
    results = []
    with tqdm(total=1 + len(levels) * REPEATS, desc=label, unit="run", leave=False) as bar:
        await run_level(one, top, top)
        bar.update()
        for c in levels:
            runs = []
            for _ in range(REPEATS):
                runs.append(await run_level(one, c, per_level(c)))
                bar.update()
            runs.sort(key=lambda r: r.tokens_per_s)
            results.append(runs[len(runs) // 2])
    return results


async def bench_engine(settings, levels: list[int], num_predict: int, per_level) -> list[LevelResult]:
    from common.models import canonical_name
    from common.protocol import ChatMessage, Sampling
    from workers.main import build_engine
    from workers.pull import ensure_local
    from workers.store import ModelStore

    name = canonical_name(settings.model)
    path = None if settings.engine == "fake" else \
        await asyncio.to_thread(ensure_local, ModelStore(settings.model_cache), name, None)
    engine = await asyncio.to_thread(build_engine, settings, name, path)
    sampling = Sampling(temperature=0, max_tokens=num_predict)
    counter = iter(range(10**9))
    try:
        async def one(i: int) -> Sample:
            prompt = engine.encode_chat([ChatMessage(role="user", content=PROMPTS[i % len(PROMPTS)])])
            start = time.perf_counter()
            first = None
            tokens = 0
            async for delta in engine.generate(f"bench-{next(counter)}", prompt, sampling, num_predict):
                if first is None and delta.text:
                    first = time.perf_counter() - start
                tokens += delta.num_tokens
            return Sample(first or 0.0, tokens)

        return await measure(one, levels, per_level, "engine")
    finally:
        engine.close()


@contextlib.asynccontextmanager
async def running_stack(settings):
    """redis-server, a worker and the API as separate processes; yields an HTTP session."""
    # aiohttp, not httpx, for the load: with its C parser the client takes ~8x less CPU per
    # token, which on a small machine would otherwise be taken from the engine and counted
    # against the stack.
    import aiohttp

    from cli.embedded_redis import EmbeddedRedis, free_port

    redis = EmbeddedRedis().start()
    port = free_port()
    env = {**os.environ, "VLLAMA_REDIS_URL": redis.url, "VLLAMA_MODEL": settings.model}
    procs = [
        subprocess.Popen([sys.executable, "-m", "cli", "worker"], env=env),
        subprocess.Popen([sys.executable, "-m", "cli", "api", "--port", str(port)], env=env),
    ]
    try:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=connector, timeout=timeout) as http:
            await _wait_healthy(http, procs)
            yield http
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        redis.stop()


async def stream_generate(http, body: dict) -> tuple[Sample, float]:
    """One streamed /api/generate: (time to first token and tokens, mean seconds between tokens)."""
    start = time.perf_counter()
    first = last = None
    tokens = chunks = 0
    async with http.post("/api/generate", json=body) as r:
        async for line in r.content:
            chunk = json.loads(line)
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("response"):
                last = time.perf_counter()
                first = first or last - start
                chunks += 1
            if chunk.get("done"):
                tokens = chunk["eval_count"]
    between = (last - start - first) / (chunks - 1) if first is not None and chunks > 1 else 0.0
    return Sample(first or 0.0, tokens), between


async def bench_stack(settings, levels: list[int], num_predict: int, per_level) -> list[LevelResult]:
    async with running_stack(settings) as http:
        async def one(i: int) -> Sample:
            body = {"model": settings.model, "prompt": PROMPTS[i % len(PROMPTS)],
                    "options": {"temperature": 0, "num_predict": num_predict}}
            return (await stream_generate(http, body))[0]

        return await measure(one, levels, per_level, "stack")


async def bench_during_batch(settings, jobs: int, num_predict: int, samples: int = 3) -> None:
    """Time to first token of streamed requests sent one after another: idle, then behind a
    backlog of ``jobs`` batch-class jobs, then behind the same backlog sent as interactive
    jobs (which queue like any request: first come, first served). The first request of each
    is the one that meets the fullest backlog."""
    from tqdm import tqdm

    async with running_stack(settings) as http:
        async def probe() -> list[tuple[Sample, float]]:
            return [await stream_generate(http, {"model": settings.model, "prompt": PROMPTS[i % len(PROMPTS)],
                                                 "options": {"temperature": 0, "num_predict": 16}})
                    for i in range(samples)]

        async def backlog(priority: str) -> list[str]:
            ids = []
            for i in tqdm(range(jobs), desc=f"{priority} backlog", unit="job", leave=False):
                body = {"model": settings.model, "prompt": PROMPTS[i % len(PROMPTS)], "priority": priority,
                        "options": {"temperature": 0, "num_predict": num_predict}}
                async with http.post("/api/jobs/generate", json=body) as r:
                    assert r.status == 202, await r.text()
                    ids.append((await r.json())["id"])
            await asyncio.sleep(2)  # the engine is full of it by now
            return ids

        async def cancel(ids: list[str]) -> None:
            for job_id in ids:  # those that ended answer 409, which is fine
                async with http.delete(f"/api/jobs/{job_id}"):
                    pass
            await asyncio.sleep(2)

        rows = [("idle", await probe())]
        for priority in ("batch", "interactive"):
            ids = await backlog(priority)
            rows.append((f"behind {jobs} {priority}-class jobs", await probe()))
            await cancel(ids)
    print()
    print(f"{'situation':<36} | {'first TTFT ms':>13} {'median TTFT ms':>14} | {'ms between tokens':>17}")
    print("-" * 88)
    for what, runs in rows:
        print(f"{what:<36} | {runs[0][0].ttft_s * 1000:>13.1f} {statistics.median(s.ttft_s for s, _ in runs) * 1000:>14.1f}"
              f" | {statistics.median(b for _, b in runs) * 1000:>17.1f}")
    print()


async def _wait_healthy(http, procs, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a stack process exited during start-up; see its output above")
        try:
            async with http.get("/health") as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        await asyncio.sleep(1)
    raise TimeoutError("the stack did not become healthy")


def print_table(engine: list[LevelResult], stack: list[LevelResult]) -> None:
    print()
    print(f"{'conc':>4} | {'engine tok/s':>12} {'stack tok/s':>11} {'ratio':>6} | "
          f"{'engine TTFT ms':>14} {'stack TTFT ms':>13} {'added ms':>8}")
    print("-" * 84)
    for e, s in zip(engine, stack):
        print(f"{e.concurrency:>4} | {e.tokens_per_s:>12.1f} {s.tokens_per_s:>11.1f} "
              f"{s.tokens_per_s / e.tokens_per_s:>6.1%} | {e.ttft_median_ms:>14.1f} {s.ttft_median_ms:>13.1f} "
              f"{s.ttft_median_ms - e.ttft_median_ms:>8.1f}")
    print()


def run_bench(args: argparse.Namespace) -> None:
    from common.settings import Settings

    settings = Settings()
    if args.model:
        settings.model = args.model
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    global REPEATS
    REPEATS = args.repeats

    def per_level(c: int) -> int:
        return args.requests_per_level or max(4, 2 * c)

    if args.during_batch:
        print(f"model {settings.model}: a streamed request idle and behind {args.during_batch} jobs of "
              f"{args.num_predict} tokens, median of 5")
        asyncio.run(bench_during_batch(settings, args.during_batch, args.num_predict))
        return
    print(f"model {settings.model}, {args.num_predict} tokens per request, greedy, levels {levels}, "
          f"median of {REPEATS} runs per level")
    print("phase 1/2: engine in-process")
    engine = asyncio.run(bench_engine(settings, levels, args.num_predict, per_level))
    print("phase 2/2: through the stack (redis-server, vllama worker, vllama api)")
    stack = asyncio.run(bench_stack(settings, levels, args.num_predict, per_level))
    print_table(engine, stack)
