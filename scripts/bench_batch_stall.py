"""Does creating a big batch stall the API? A chat's first-token delay, idle and during creation.

Starts Redis and the stack with the fake engine (API and worker in this process, real HTTP),
uploads a batch file of --lines chat requests, then measures the delay to a streamed chat's
first token: first with nothing else going on, then over and over while the batch is being
created (POST /v1/batches, which returns once every line is queued). The goal is that the
worst delay during creation stays within 0.5 s of the idle one.

    .venv/bin/python scripts/bench_batch_stall.py [--lines 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from cli.embedded_redis import EmbeddedRedis  # noqa: E402
from tests.fake_stack import MODEL, fake_stack  # noqa: E402
from workers.fake_engine import FakeEngine  # noqa: E402


def batch_file(lines: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": MODEL, "max_tokens": 2,
                                        "messages": [{"role": "user", "content": f"question {i}"}]}}) + "\n"
                   for i in range(lines)).encode()


async def first_token_s(http) -> float:
    started = time.perf_counter()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    delay = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():  # to the end, so the connection can be reused
            if delay is None and line.startswith("data: ") and '"content"' in line:
                delay = time.perf_counter() - started
    if delay is None:
        raise RuntimeError("the chat ended without a token")
    return delay


async def loop_lag(stop: asyncio.Event, gaps: list[float]) -> None:
    """The longest the event loop went without running this task (10 ms naps)."""
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.perf_counter()
        gaps.append(now - last - 0.01)
        last = now


async def main(lines: int) -> None:
    server = EmbeddedRedis().start()
    try:
        engine = FakeEngine(answer_tokens=2, step_s=0.001)
        async with fake_stack(server.url, engine=engine, max_upload_bytes=2**30) as stack:
            async with httpx.AsyncClient(base_url=stack.base_url, timeout=600) as http:
                data = batch_file(lines)
                t = time.perf_counter()
                r = await http.post("/v1/files", files={"file": ("big.jsonl", data)}, data={"purpose": "batch"})
                r.raise_for_status()
                print(f"upload: {len(data) / 2**20:.1f} MiB, {lines} lines, {time.perf_counter() - t:.2f} s")
                file_id = r.json()["id"]

                for _ in range(3):  # warm up
                    await first_token_s(http)
                idle = [await first_token_s(http) for _ in range(20)]

                stop, gaps = asyncio.Event(), []
                lag = asyncio.create_task(loop_lag(stop, gaps))
                t = time.perf_counter()
                create = asyncio.create_task(http.post("/v1/batches", json={
                    "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
                busy: list[float] = []
                while not create.done():
                    busy.append(await first_token_s(http))
                r = await create
                created_s = time.perf_counter() - t
                stop.set()
                await lag
                r.raise_for_status()
                assert r.json()["request_counts"]["total"] == lines, r.text

        def figures(xs: list[float]) -> str:
            return f"median {statistics.median(xs) * 1000:.0f} ms, max {max(xs) * 1000:.0f} ms ({len(xs)} chats)"

        print(f"batch creation: {created_s:.2f} s for {lines} lines")
        print(f"first token, idle:           {figures(idle)}")
        print(f"first token, during create:  {figures(busy)}")
        print(f"event loop's longest stall during create: {max(gaps) * 1000:.0f} ms")
        worst = max(busy) - statistics.median(idle)
        print(f"worst during create - idle median = {worst * 1000:.0f} ms (goal: under 500 ms): "
              f"{'OK' if worst < 0.5 else 'OVER'}")
    finally:
        server.stop()


if __name__ == "__main__":
    logging.getLogger("arq").setLevel(logging.ERROR)  # not a line per job left queued at the end
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    asyncio.run(main(parser.parse_args().lines))
