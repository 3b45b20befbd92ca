"""Routing figures (api/routing.py), with fake engines: where bursts land, what affinity does
for the prefix cache and the time to first token, and what a routing decision costs.

Runs, in this process, an API and 2 or 3 workers on a private Redis, each worker with a fake
engine that keeps a prefix cache (it counts hits as vLLM does) and takes --prefill-us of
prefill per prompt token it does not find there, one prefill at a time:
- bursts: 12, 48 and 200 async jobs submitted together, on 2 and 3 workers of 128 slots,
  routing off (whoever polls first takes what it has room for) and on: jobs run per worker;
- affinity: --chats chats sharing a --prefix-tokens system prompt (one token per character
  in the fake engine), differing after it, --concurrency at a time over 2 workers, routed by
  load alone and then with affinity: the share of prompt tokens found in the prefix cache,
  and TTFT p50/p90 (from the request to its first streamed token, through the API). Run also
  with --prefixes N for N different system prompts sharing the chats;
- decision cost: the API's route() for one job (reads the workers' loads and the prompt's
  prefix owners in one round trip), mean over --decisions jobs.

With --vllm, the affinity figures come from real vLLM instead: two `vllama worker` processes
serving the bundled model (vLLM's prefix caching on, as always), a `vllama api` process per
setting, and the hit rate from vLLM's own counters in /metrics.

    .venv/bin/python scripts/bench_routing.py [--chats 64] [--prefix-tokens 2000] [--prefixes 1]
    .venv/bin/python scripts/bench_routing.py --vllm [--chats 64] [--prefix-tokens 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from api.routing import Router  # noqa: E402
from cli.embedded_redis import EmbeddedRedis  # noqa: E402
from common import keys, registry  # noqa: E402
from common.protocol import ChatMessage, GenerationJob  # noqa: E402
from common.redis_conn import connect  # noqa: E402
from tests.fake_stack import MODEL, fake_stack  # noqa: E402
from workers.fake_engine import FakeEngine  # noqa: E402
from workers.main import GenerationWorker  # noqa: E402


@asynccontextmanager
async def cluster(redis_url: str, workers: int, engine_kwargs: dict, **settings):
    async with fake_stack(redis_url, worker=False, max_jobs=128, batch_share=1.0, heartbeat_ttl_s=10.0,
                          **settings) as stack:
        engines = [FakeEngine(max_model_len=32768, **engine_kwargs) for _ in range(workers)]
        procs = [GenerationWorker(stack.settings, engine=e, engine_factory=lambda n, p: FakeEngine()) for e in engines]
        tasks = [asyncio.create_task(w.run(redis=await connect(redis_url))) for w in procs]
        while True:
            live = await registry.live_workers(stack.redis)
            if sum(1 for w in live if w.state == "ready" and w.status_of(MODEL)) == workers:
                break
            await asyncio.sleep(0.05)
        async with stack.client() as http:
            await http.get("/api/ps")
        try:
            yield stack, dict(zip((w.worker_id for w in procs), engines))
        finally:
            for w in procs:
                w.stop()
            await asyncio.gather(*tasks, return_exceptions=True)


async def burst(redis_url: str, workers: int, size: int, route: bool) -> list[int]:
    async with cluster(redis_url, workers, {"step_s": 0.02, "answer_tokens": 25}, route=route) as (stack, engines), \
            stack.client() as http:
        async def one(i: int) -> str:
            r = await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": f"job {i}"})
            return r.json()["id"]

        ids = await asyncio.gather(*(one(i) for i in range(size)))
        while True:
            records = [json.loads(r) for r in await stack.redis.mget([keys.job_record(i) for i in ids])]
            if all(r["status"] == "done" for r in records):
                break
            await asyncio.sleep(0.05)
        ran = Counter(r["worker_id"] for r in records)
        return sorted((ran.get(w, 0) for w in engines), reverse=True)


async def chats(redis_url: str, args: argparse.Namespace, affinity: bool) -> dict:
    engine = {"step_s": 0.005, "answer_tokens": 8, "prefill_s_per_token": args.prefill_us / 1e6}
    async with cluster(redis_url, 2, engine, route_affinity=affinity) as (stack, engines), \
            stack.client() as http:
        ttfts = await ttfts_of_chats(http, args, MODEL, system_prompts(args, len(REPEATED)))  # a token per character
        queries = sum(e.prefix_cache_queries for e in engines.values())
        hits = sum(e.prefix_cache_hits for e in engines.values())
        return {"hit_rate": round(hits / queries, 3), **percentiles_ms(ttfts), "chats_per_worker": sorted(
            (len(e.started) for e in engines.values()), reverse=True)}


REPEATED = "Answer as a careful assistant would. "  # 37 characters, 7 tokens of the bundled model


def system_prompts(args: argparse.Namespace, tokens_per_repeat: int, tag: str = "") -> list[str]:
    """--prefixes system prompts of about --prefix-tokens tokens each."""
    return [f"System prompt {tag}{p}: " + REPEATED * (args.prefix_tokens // tokens_per_repeat)
            for p in range(args.prefixes)]


async def ttfts_of_chats(http, args: argparse.Namespace, model: str, prompts: list[str], **extra) -> list[float]:
    """--chats chats over the prompts, --concurrency at a time: each one's time to first token."""
    gate = asyncio.Semaphore(args.concurrency)
    ttfts: list[float] = []

    async def one(i: int) -> None:
        body = {"model": model, "messages": [{"role": "system", "content": prompts[i % len(prompts)]},
                                             {"role": "user", "content": f"Question number {i}?"}], **extra}
        async with gate:
            started = time.perf_counter()
            async with http.stream("POST", "/api/chat", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"chat {i}: {r.status_code} {(await r.aread()).decode()}")
                lines = r.aiter_lines()
                async for line in lines:
                    if line and "error" in (got := json.loads(line)):
                        raise RuntimeError(f"chat {i}: {got['error']}")
                    if line and got["message"]["content"]:
                        ttfts.append(time.perf_counter() - started)
                        break
                async for _ in lines:
                    pass

    await asyncio.gather(*(one(i) for i in range(args.chats)))
    return ttfts


def percentiles_ms(ttfts: list[float]) -> dict:
    return {"ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
            "ttft_p90_ms": round(statistics.quantiles(ttfts, n=10)[8] * 1000, 1)}


def metric_by_worker(text: str, name: str) -> Counter:
    return Counter({m.group(1): float(m.group(2)) for m in re.finditer(rf'{name}\{{worker="([^"]+)",[^}}]*\}} (\S+)', text)})


async def vllm_chats(args: argparse.Namespace) -> None:
    """The affinity figures through real vLLM: worker and API processes, as a user runs them."""
    import httpx

    from tests.e2e.conftest import MODEL as BUNDLED
    from tests.e2e.conftest import start_worker, wait_ready
    from tests.harness import start_api

    with tempfile.TemporaryDirectory() as tmp:
        home, logs = Path(tmp) / "home", Path(tmp) / "logs"
        logs.mkdir()
        redis = EmbeddedRedis(data_dir=Path(tmp) / "redis").start()
        env = {"VLLAMA_HOME": str(home), "HF_HUB_OFFLINE": "1", "VLLAMA_MAX_JOBS": str(2 * args.concurrency)}
        workers = [start_worker(redis.url, logs / f"worker-{i}.log", **env) for i in range(2)]
        try:
            api, base = start_api(redis.url, logs, **env)
            wait_ready(base, workers[0], n_workers=2)
            api.stop()
            for affinity in (False, True):
                api, base = start_api(redis.url, logs, VLLAMA_ROUTE_AFFINITY=str(affinity).lower(), **env)
                try:
                    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
                        before = (await http.get("/metrics")).text
                        # A prompt of its own per setting, so each starts from a cold cache.
                        ttfts = await ttfts_of_chats(http, args, BUNDLED, system_prompts(args, 7, "A" if affinity else "B"),
                                                     options={"num_predict": 8, "temperature": 0, "num_ctx": 8192})
                        await asyncio.sleep(3)  # vLLM's counters reach /metrics with the next heartbeat
                        after = (await http.get("/metrics")).text
                finally:
                    api.stop()
                queries, hits = (metric_by_worker(after, n) - metric_by_worker(before, n)
                                 for n in ("vllama_prefix_cache_queries_total", "vllama_prefix_cache_hits_total"))
                prompt_tokens = sorted((int(v) for v in queries.values()), reverse=True)
                print(f"vLLM, {args.chats} chats, {args.prefixes} shared prefix(es) of about {args.prefix_tokens} "
                      f"tokens, {'affinity' if affinity else 'load alone'}: hit rate "
                      f"{sum(hits.values()) / sum(queries.values()):.3f}, {percentiles_ms(ttfts)}, "
                      f"prompt tokens per worker {prompt_tokens}", flush=True)
        finally:
            for w in workers:
                w.stop()
            redis.stop()


async def decision_cost(redis_url: str, n: int) -> dict:
    async with cluster(redis_url, 3, {"step_s": 0.01, "answer_tokens": 1}) as (stack, _):
        router = Router(stack.redis, 2.0)
        workers = await registry.live_workers(stack.redis)
        out = {}
        for label, content in (("short prompt", "hi"), ("8K-character prompt", "x" * 8192)):
            job = GenerationJob(job_id="j", model=MODEL, kind="chat", messages=[ChatMessage(role="user", content=content)])
            started = time.perf_counter()
            for _ in range(n):
                job.route = None
                await router.route([job], workers)
                router.settle([job])
            out[label] = f"{(time.perf_counter() - started) / n * 1e6:.0f} us"
        return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, default=64)
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--prefixes", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prefill-us", type=float, default=200.0, help="prefill per uncached prompt token (µs)")
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--skip-bursts", action="store_true")
    parser.add_argument("--vllm", action="store_true", help="the affinity figures through real vLLM, nothing else")
    args = parser.parse_args()
    if args.vllm:
        await vllm_chats(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(data_dir=Path(tmp)).start()
        try:
            if not args.skip_bursts:
                for workers in (2, 3):
                    for size in (12, 48, 200):
                        before = await burst(redis.url, workers, size, route=False)
                        after = await burst(redis.url, workers, size, route=True)
                        print(f"burst {size:>3} on {workers} workers: jobs per worker {before} unrouted, {after} routed",
                              flush=True)
            for affinity in (False, True):
                figures = await chats(redis.url, args, affinity)
                print(f"{args.chats} chats, {args.prefixes} shared {args.prefix_tokens}-token prefix(es), "
                      f"{'affinity' if affinity else 'load alone'}: {figures}", flush=True)
            print(f"routing decision, 3 workers: {await decision_cost(redis.url, args.decisions)}", flush=True)
        finally:
            redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
