"""Stream correctness at speed: with many streams in flight, frames travel bundled per engine
step and API process and are split again there (workers/frames.py, api/pubsub.py); every
client must still get exactly its own answer, in order, nothing lost or doubled."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.fake_stack import MODEL, fake_stack
from workers.fake_engine import FakeEngine

STREAMS = 1000
TOKENS = 24


def expected(i: int) -> str:
    return "".join(f"s{i}:{k} " for k in range(TOKENS))  # the fake engine's answer to "label:s<i>"


async def ollama_stream(http: httpx.AsyncClient, i: int) -> tuple[str, int]:
    body = {"model": MODEL, "prompt": f"answer with label:s{i} please", "options": {"num_predict": TOKENS}}
    text, count = [], None
    async with http.stream("POST", "/api/generate", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            chunk = json.loads(line)
            assert "error" not in chunk, chunk
            text.append(chunk["response"])
            if chunk["done"]:
                count = chunk["eval_count"]
    return "".join(text), count


async def openai_stream(http: httpx.AsyncClient, i: int) -> tuple[str, int]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"label:s{i}"}], "max_tokens": TOKENS,
            "stream": True, "stream_options": {"include_usage": True}}
    text, count = [], None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if event.get("usage"):
                count = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                text.append(choice["delta"].get("content") or "")
    return "".join(text), count


async def test_a_thousand_concurrent_streams_each_get_their_own_tokens_in_order(redis_server):
    engine = FakeEngine(stepwise=True, step_s=0.01, max_num_seqs=STREAMS, answer_tokens=10**6)
    async with fake_stack(redis_server.url, engine=engine, max_jobs=STREAMS, max_queue=STREAMS) as stack:
        limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=STREAMS)
        async with httpx.AsyncClient(base_url=stack.base_url, limits=limits, timeout=300) as http:
            answers = await asyncio.gather(*((ollama_stream if i % 2 else openai_stream)(http, i)
                                             for i in range(STREAMS)))
    wrong = [(i, text) for i, (text, _) in enumerate(answers) if text != expected(i)]
    assert not wrong, f"{len(wrong)} streams got another answer, e.g. stream {wrong[0][0]}: {wrong[0][1][:200]!r}"
    assert all(count == TOKENS for _, count in answers)
