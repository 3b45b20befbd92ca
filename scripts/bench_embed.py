"""Embeddings per second for one worker: the engine in this process against the same engine
behind the whole stack (HTTP -> API -> Redis -> worker -> pub/sub -> API -> HTTP).

At each batch size B it embeds the same inputs, B per request (per engine call in-process),
keeping ``--concurrency`` requests in flight, and prints inputs per second both ways and their
ratio. The engine way tokenizes in the same process, as the worker does.

    .venv/bin/python scripts/bench_embed.py                     # all-minilm, B = 1, 32, 256
    .venv/bin/python scripts/bench_embed.py --batch 1,32 --inputs 1024 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.bench import model_dir, running_stack  # noqa: E402

WORDS = "cat dog river stock bond market poem sea light code table bicycle autumn leaf story".split()


def inputs(count: int) -> list[str]:
    """Distinct sentences of 8 to 16 words (about 10 to 20 tokens)."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8 + i % 9)) + f" {i}." for i in range(count)]


async def in_flight(calls: list, concurrency: int) -> float:
    """Runs the calls, ``concurrency`` at a time; the seconds it took."""
    queue = list(reversed(calls))

    async def lane() -> None:
        while queue:
            await queue.pop()()

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - start


async def bench_engine(settings, texts: list[str], batches: list[int], concurrency: int) -> dict[int, float]:
    from common.models import canonical_name
    from workers.main import build_engine

    engine = await asyncio.to_thread(build_engine, settings, canonical_name(settings.model), await model_dir(settings))
    counter = iter(range(10**9))
    try:
        async def one(chunk: list[str]) -> None:
            await engine.embed(f"bench-{next(counter)}", engine.encode_inputs(chunk, engine.max_model_len))

        await one(texts[:8])  # warm up
        return {b: len(texts) / await in_flight([lambda c=c: one(c) for c in _chunks(texts, b)], concurrency)
                for b in batches}
    finally:
        engine.close()


async def bench_stack(settings, texts: list[str], batches: list[int], concurrency: int) -> dict[int, float]:
    async with running_stack(settings) as stack:
        http = stack.http

        async def one(chunk: list[str]) -> None:
            async with http.post("/api/embed", json={"model": settings.model, "input": chunk}) as r:
                body = await r.json()
                assert r.status == 200 and len(body["embeddings"]) == len(chunk), body

        await one(texts[:8])  # loads the model, warms up
        return {b: len(texts) / await in_flight([lambda c=c: one(c) for c in _chunks(texts, b)], concurrency)
                for b in batches}


def _chunks(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all-minilm")
    parser.add_argument("--batch", default="1,32,256", help="inputs per request, comma-separated")
    parser.add_argument("--inputs", type=int, default=2048, help="inputs embedded at each batch size")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    args = parser.parse_args()

    from common.settings import Settings

    settings = Settings(model=args.model)
    batches = [int(b) for b in args.batch.split(",")]
    texts = inputs(args.inputs)
    print(f"model {args.model}: {args.inputs} inputs at each batch size, {args.concurrency} requests in flight")
    print("phase 1/2: engine in-process")
    engine = asyncio.run(bench_engine(settings, texts, batches, args.concurrency))
    print("phase 2/2: through the stack (redis-server, vllama worker, vllama api)")
    stack = asyncio.run(bench_stack(settings, texts, batches, args.concurrency))
    print(f"{'batch':>6} {'engine inputs/s':>16} {'stack inputs/s':>15} {'ratio':>6}")
    for b in batches:
        print(f"{b:>6} {engine[b]:>16.1f} {stack[b]:>15.1f} {stack[b] / engine[b]:>6.2f}")


if __name__ == "__main__":
    main()
