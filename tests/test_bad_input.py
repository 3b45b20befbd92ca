"""Every bad input gets a clear 4xx naming what is wrong, never a 5xx; limits answer 413 naming
the setting. One stack with the fake engine (real Redis, real HTTP) serves the whole table.

Each row: endpoint, body, expected status, a word the message must contain. Generation rows
run streaming and not (an error before the first token is a real status either way)."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
import pytest_asyncio

from common import keys, registry
from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until
from workers.fake_engine import VOCAB_SIZE, FakeEngine

pytestmark = pytest.mark.asyncio(loop_scope="session")

REQUEST_LIMIT = 64 * 1024
PROMPT_LIMIT = 16 * 1024
MESSAGES_LIMIT = 8
N_LIMIT = 4
SLOW = "<<slow-to-tokenize>>"  # a prompt holding this is tokenized only when the test says so
NAN, INF = math.nan, math.inf


class SlowTokenizer(FakeEngine):
    """Tokenizes a prompt holding SLOW the way a real tokenizer does a huge prompt: its thread is
    busy (here: blocked until the test releases it) and it gives up the event loop to no one."""

    def __init__(self) -> None:
        super().__init__(max_model_len=200_000)
        self.slow_started = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()

    def _slow(self, text: str) -> None:
        if SLOW in text:
            self.slow_started.set()
            self.release.wait(60)  # a blocked loop would stall the test until this gives up
            self.returned.set()

    def encode_chat(self, messages, tools=None, template_kwargs=None):
        self._slow("".join(m.content for m in messages))
        return super().encode_chat(messages, tools, template_kwargs)

    def encode_raw(self, text: str) -> list[int]:
        self._slow(text)
        return super().encode_raw(text)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(redis_server) -> AsyncIterator[Any]:
    async with fake_stack(redis_server.url, engine=SlowTokenizer(), max_request_bytes=REQUEST_LIMIT,
                          max_prompt_bytes=PROMPT_LIMIT, max_messages=MESSAGES_LIMIT, max_n=N_LIMIT) as s:
        yield s


GEN, CHAT, OCHAT, OCOMP = "/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"
P = {"model": MODEL, "prompt": "hi"}
C = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def opts(**options: Any) -> dict[str, Any]:
    return {"options": options}


def user(content: Any, role: str = "user", **more: Any) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content, **more}]}


# (endpoint, body, status, a word the message contains). Bodies are sent as Python's json.dumps
# writes them: NaN and Infinity as those words, as a careless client's JSON library would.
GENERATION: list[tuple[str, dict[str, Any], int, str]] = [
    # Ollama /api/generate
    (GEN, {**P, **opts(temperature=NAN)}, 400, "options.temperature"),
    (GEN, {**P, **opts(temperature=INF)}, 400, "options.temperature"),
    (GEN, {**P, **opts(temperature=-INF)}, 400, "options.temperature"),
    (GEN, {**P, **opts(temperature=3)}, 400, "options.temperature"),
    (GEN, {**P, **opts(temperature="hot")}, 400, "options.temperature"),
    (GEN, {**P, **opts(top_p=NAN)}, 400, "options.top_p"),
    (GEN, {**P, **opts(top_p=1.5)}, 400, "options.top_p"),
    (GEN, {**P, **opts(min_p=INF)}, 400, "options.min_p"),
    (GEN, {**P, **opts(top_k=-1)}, 400, "options.top_k"),
    (GEN, {**P, **opts(top_k=2**40)}, 400, "options.top_k"),
    (GEN, {**P, **opts(repeat_penalty=NAN)}, 400, "options.repeat_penalty"),
    (GEN, {**P, **opts(presence_penalty=INF)}, 400, "options.presence_penalty"),
    (GEN, {**P, **opts(num_predict=-3)}, 400, "options.num_predict"),
    (GEN, {**P, **opts(num_predict=2**40)}, 400, "options.num_predict"),
    (GEN, {**P, **opts(num_ctx=0)}, 400, "options.num_ctx"),
    (GEN, {**P, **opts(num_ctx=2**40)}, 400, "options.num_ctx"),
    (GEN, {**P, **opts(seed=2**64)}, 400, "options.seed"),
    (GEN, {**P, **opts(seed=2**63)}, 400, "options.seed"),
    (GEN, {**P, **opts(seed=-(2**63) - 1)}, 400, "options.seed"),
    (GEN, {**P, **opts(stop=[f"s{i}" for i in range(65)])}, 400, "options.stop"),
    (GEN, {**P, **opts(stop="x" * 1001)}, 400, "options.stop"),
    (GEN, {**P, **opts(stop=5)}, 400, "options.stop"),
    (GEN, {**P, "options": "fast"}, 400, "options"),
    (GEN, {**P, "keep_alive": 1e300}, 400, "keep_alive"),
    (GEN, {**P, "keep_alive": 2**70}, 400, "keep_alive"),
    (GEN, {**P, "keep_alive": "1e300"}, 400, "keep_alive"),
    (GEN, {**P, "keep_alive": "9999999h"}, 400, "keep_alive"),
    (GEN, {**P, "keep_alive": "soon"}, 400, "keep_alive"),
    (GEN, {**P, "keep_alive": NAN}, 400, "keep_alive"),
    (GEN, {**P, "keep_alive": INF}, 400, "keep_alive"),
    (GEN, {**P, "keep_alive": -INF}, 400, "keep_alive"),
    (GEN, {**P, "keep_alive": [5]}, 400, "keep_alive"),
    (GEN, {**P, "keep_alive": True}, 400, "keep_alive"),
    (GEN, {**P, "context": [-1]}, 400, "context"),
    (GEN, {**P, "context": [2**40]}, 400, "context"),
    (GEN, {**P, "context": [1.5]}, 400, "context"),
    (GEN, {**P, "context": ["a"]}, 400, "context"),
    (GEN, {**P, "context": [1, 2, VOCAB_SIZE]}, 400, "context[2]"),  # in range, not in the vocabulary
    (GEN, {**P, "format": 5}, 400, "format"),
    (GEN, {**P, "format": "yaml"}, 400, "format"),
    (GEN, {**P, "format": {"type": "object", "maxProperties": NAN}}, 400, "format"),
    (GEN, {**P, "prompt": 5}, 400, "prompt"),
    (GEN, {**P, "prompt": ["a", "b"]}, 400, "prompt"),
    (GEN, {**P, "system": {"a": 1}}, 400, "system"),
    (GEN, {**P, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
    (GEN, {**P, "think": 5}, 400, "think"),
    (GEN, {**P, "model": 5}, 400, "model"),
    # Ollama /api/chat
    (CHAT, {**C, **user("hi", role="wizard")}, 400, "role"),
    (CHAT, {**C, **user("hi", role=5)}, 400, "role"),
    (CHAT, {**C, **user(5)}, 400, "content"),
    (CHAT, {**C, **user({"text": "hi"})}, 400, "content"),
    (CHAT, {**C, **user(["hi"])}, 400, "content"),
    (CHAT, {**C, "messages": "hi"}, 400, "messages"),
    (CHAT, {**C, "messages": [5]}, 400, "messages.0"),
    (CHAT, {**C, **user("", role="assistant", tool_calls=[{"function": {"name": 5}}])}, 400, "name"),
    (CHAT, {**C, **user("", role="assistant", tool_calls=[{"function": {"name": "f", "arguments": "x"}}])},
     400, "arguments"),
    (CHAT, {**C, **user("", role="assistant", tool_calls=[{"function": {"name": "f", "arguments": {"a": INF}}}])},
     400, "arguments"),
    (CHAT, {**C, "tools": "all"}, 400, "tools"),
    (CHAT, {**C, "tools": [{"type": "retrieval"}]}, 400, "tools[0]"),
    (CHAT, {**C, "tools": [{**TOOL, "function": {"name": "f", "parameters": {"maximum": NAN}}}]}, 400, "tools"),
    (CHAT, {**C, **user("hi", images=["aGk="])}, 400, "images"),
    (CHAT, {**C, **opts(seed=2**64)}, 400, "options.seed"),
    (CHAT, {**C, **opts(temperature=NAN)}, 400, "options.temperature"),
    (CHAT, {**C, "keep_alive": 1e300}, 400, "keep_alive"),
    # OpenAI /v1/chat/completions
    (OCHAT, {**C, "temperature": NAN}, 400, "temperature"),
    (OCHAT, {**C, "temperature": 2.5}, 400, "temperature"),
    (OCHAT, {**C, "top_p": 0}, 400, "top_p"),
    (OCHAT, {**C, "top_p": INF}, 400, "top_p"),
    (OCHAT, {**C, "frequency_penalty": NAN}, 400, "frequency_penalty"),
    (OCHAT, {**C, "presence_penalty": 3}, 400, "presence_penalty"),
    (OCHAT, {**C, "seed": 2**64}, 400, "seed"),
    (OCHAT, {**C, "seed": 2**63}, 400, "seed"),
    (OCHAT, {**C, "seed": -(2**63) - 1}, 400, "seed"),
    (OCHAT, {**C, "max_tokens": 0}, 400, "max_tokens"),
    (OCHAT, {**C, "max_tokens": 2**40}, 400, "max_tokens"),
    (OCHAT, {**C, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    (OCHAT, {**C, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (OCHAT, {**C, "stop": "x" * 1001}, 400, "stop"),
    (OCHAT, {**C, "stop": 5}, 400, "stop"),
    (OCHAT, {**C, "tools": [TOOL], "tool_choice": {"type": "function", "function": "f"}}, 400, "tool_choice"),
    (OCHAT, {**C, "tools": [TOOL], "tool_choice": {"type": "function"}}, 400, "tool_choice"),
    (OCHAT, {**C, "tools": [TOOL], "tool_choice": "sometimes"}, 400, "tool_choice"),
    (OCHAT, {**C, "tools": [TOOL], "tool_choice": 5}, 400, "tool_choice"),
    (OCHAT, {**C, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "'g'"),
    (OCHAT, {**C, "tools": [TOOL], "tool_choice": {"type": "custom", "custom": {"name": "f"}}}, 400, "custom"),
    (OCHAT, {**C, "tools": [TOOL], "tool_choice": {"type": "allowed_tools", "allowed_tools": {
        "mode": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]}}}, 400, "tool_choice"),
    (OCHAT, {**C, "tools": [TOOL], "tool_choice": {"type": "allowed_tools", "allowed_tools": {
        "mode": "auto", "tools": [{"type": "function", "function": {"name": "g"}}]}}}, 400, "'g'"),
    (OCHAT, {**C, "tool_choice": "required"}, 400, "tools"),
    (OCHAT, {**C, "tools": [{**TOOL, "function": {"name": "f", "parameters": {"minimum": -INF}}}]}, 400, "tools"),
    (OCHAT, {**C, **user("hi", role="wizard")}, 400, "role"),
    (OCHAT, {**C, **user("hi", role="function")}, 400, "role"),
    (OCHAT, {**C, **user(5)}, 400, "content"),
    (OCHAT, {**C, **user({"type": "text", "text": "hi"})}, 400, "content"),
    (OCHAT, {**C, **user([5])}, 400, "content"),
    (OCHAT, {**C, **user([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])}, 400, "image_url"),
    (OCHAT, {**C, **user([{"type": "text"}])}, 400, "text"),
    (OCHAT, {**C, **user([{"type": "text", "text": 5}])}, 400, "text"),
    (OCHAT, {**C, **user([{"type": "text", "text": "hi", "weight": NAN}])}, 400, "content"),
    (OCHAT, {**C, **user("", role="assistant", tool_calls=[
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "NaN"}}])}, 400, "arguments"),
    (OCHAT, {**C, "messages": []}, 400, "messages"),
    (OCHAT, {**C, "messages": "hi"}, 400, "messages"),
    (OCHAT, {**C, "n": 0}, 400, "n "),
    (OCHAT, {**C, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (OCHAT, {**C, "response_format": {"type": "yaml"}}, 400, "response_format"),
    (OCHAT, {**C, "response_format": {"type": "json_schema", "json_schema": {"schema": {"maximum": INF}}}},
     400, "response_format"),
    (OCHAT, {**C, "stream_options": "usage"}, 400, "stream_options"),
    (OCHAT, {**C, "model": 5}, 400, "model"),
    # OpenAI /v1/completions
    (OCOMP, {**P, "temperature": INF}, 400, "temperature"),
    (OCOMP, {**P, "seed": 2**64}, 400, "seed"),
    (OCOMP, {**P, "max_tokens": 0}, 400, "max_tokens"),
    (OCOMP, {**P, "max_tokens": 2**40}, 400, "max_tokens"),
    (OCOMP, {**P, "logprobs": 6}, 400, "logprobs"),
    (OCOMP, {**P, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (OCOMP, {**P, "prompt": 5}, 400, "prompt"),
    (OCOMP, {**P, "prompt": [1, 2, 3]}, 400, "prompt"),
    (OCOMP, {**P, "prompt": []}, 400, "prompt"),
    (OCOMP, {**P, "prompt": ["a"] * 129}, 400, "prompts"),
    (OCOMP, {**P, "echo": True}, 400, "echo"),
    # Limits: 413 naming the setting
    (GEN, {**P, "prompt": "x" * (PROMPT_LIMIT + 1)}, 413, "VLLAMA_MAX_PROMPT_BYTES"),
    (GEN, {**P, "prompt": "é" * (PROMPT_LIMIT // 2 + 1)}, 413, "VLLAMA_MAX_PROMPT_BYTES"),  # bytes, not characters
    (GEN, {**P, "prompt": "x" * (PROMPT_LIMIT // 2), "system": "y" * (PROMPT_LIMIT // 2 + 1)}, 413,
     "VLLAMA_MAX_PROMPT_BYTES"),
    (CHAT, {**C, "messages": [{"role": "user", "content": "x" * (PROMPT_LIMIT // 3 + 1)}] * 3}, 413,
     "VLLAMA_MAX_PROMPT_BYTES"),
    (CHAT, {**C, "tools": [{**TOOL, "function": {"name": "f", "description": "d" * PROMPT_LIMIT}}]}, 413,
     "VLLAMA_MAX_PROMPT_BYTES"),
    (CHAT, {**C, "messages": [{"role": "user", "content": "x"}] * (MESSAGES_LIMIT + 1)}, 413, "VLLAMA_MAX_MESSAGES"),
    (OCHAT, {**C, "messages": [{"role": "user", "content": [{"type": "text", "text": "x" * PROMPT_LIMIT}]},
                               {"role": "user", "content": "x"}]}, 413, "VLLAMA_MAX_PROMPT_BYTES"),
    (OCHAT, {**C, "messages": [{"role": "user", "content": "x"}] * (MESSAGES_LIMIT + 1)}, 413, "VLLAMA_MAX_MESSAGES"),
    (OCHAT, {**C, "n": N_LIMIT + 1}, 413, "VLLAMA_MAX_N"),
    (OCHAT, {**C, "n": 2**70}, 413, "VLLAMA_MAX_N"),
    (OCOMP, {**P, "n": N_LIMIT + 1}, 413, "VLLAMA_MAX_N"),
    (OCOMP, {**P, "prompt": ["x" * (PROMPT_LIMIT // 2 + 1)] * 2}, 413, "VLLAMA_MAX_PROMPT_BYTES"),
    (GEN, {**P, "prompt": "x" * (REQUEST_LIMIT + 1)}, 413, "VLLAMA_MAX_REQUEST_BYTES"),
    (OCHAT, {**C, **user("x" * (REQUEST_LIMIT + 1))}, 413, "VLLAMA_MAX_REQUEST_BYTES"),
]

MANAGEMENT: list[tuple[str, str, dict[str, Any] | list[Any], int, str]] = [
    # (method, endpoint, body, status, word)
    ("POST", "/api/pull", {"model": 5}, 400, "model"),
    ("POST", "/api/pull", {"model": ""}, 400, "model"),
    ("POST", "/api/pull", {"model": "../../etc/passwd"}, 400, "model"),
    ("POST", "/api/pull", {"model": "x" * 5000}, 400, "model"),
    ("POST", "/api/pull", {"model": "smollm2", "stream": "maybe"}, 400, "stream"),
    ("POST", "/api/pull", ["smollm2"], 400, "JSON object"),
    ("POST", "/api/pull", {"model": "x" * (REQUEST_LIMIT + 1)}, 413, "VLLAMA_MAX_REQUEST_BYTES"),
    ("POST", "/api/show", {"model": 5}, 400, "model"),
    ("POST", "/api/show", {}, 400, "model"),
    ("POST", "/api/show", {"model": "a b!"}, 400, "model"),
    ("POST", "/api/show", {"model": MODEL, "verbose": "very"}, 400, "verbose"),
    ("POST", "/api/copy", {"source": 5, "destination": "x:1"}, 400, "source"),
    ("POST", "/api/copy", {"source": MODEL, "destination": ""}, 400, "destination"),
    ("POST", "/api/copy", {"source": MODEL, "destination": "../x"}, 400, "destination"),
    ("DELETE", "/api/delete", {"model": []}, 400, "model"),
    ("DELETE", "/api/delete", {"model": ""}, 400, "name"),
    ("DELETE", "/api/delete", {"model": "a/../b"}, 400, "name"),
    ("POST", "/api/jobs/generate", {**P, **opts(seed=2**64)}, 400, "options.seed"),
    ("POST", "/api/jobs/generate", {**P, "keep_alive": 1e300}, 400, "keep_alive"),
    ("POST", "/api/jobs/generate", {**P, "prompt": "x" * (PROMPT_LIMIT + 1)}, 413, "VLLAMA_MAX_PROMPT_BYTES"),
    ("POST", "/api/jobs/chat", {**C, "messages": [{"role": "user", "content": "x"}] * (MESSAGES_LIMIT + 1)},
     413, "VLLAMA_MAX_MESSAGES"),
]


def message_of(endpoint: str, response) -> str:
    """The error message in the endpoint family's shape (OpenAI's object under /v1/)."""
    body = response.json()
    if endpoint.startswith("/v1/"):
        assert set(body) == {"error"} and isinstance(body["error"]["message"], str), body
        return body["error"]["message"]
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


def case_id(case: tuple) -> str:
    endpoint, body, status, word = case
    return f"{endpoint}-{status}-{word}"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("case", GENERATION, ids=[case_id(c) for c in GENERATION])
async def test_bad_generation_input_is_a_clear_4xx(stack, case, stream):
    endpoint, body, status, word = case
    async with stack.client() as http:
        r = await http.post(endpoint, content=json.dumps({**body, "stream": stream}),
                            headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text[:500]
    message = message_of(endpoint, r)
    assert word in message, message
    assert "/tmp" not in message and "Traceback" not in message


@pytest.mark.parametrize("case", MANAGEMENT, ids=[f"{m}{e}-{s}-{w}" for m, e, b, s, w in MANAGEMENT])
async def test_bad_management_input_is_a_clear_4xx(stack, case):
    method, endpoint, body, status, word = case
    async with stack.client() as http:
        r = await http.request(method, endpoint, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text[:500]
    assert word in message_of(endpoint, r)


RAW: list[tuple[str, str, str]] = [
    # (endpoint, body text, word): numbers no JSON library writes, but a parser reads
    (GEN, '{"model": "%s", "prompt": "x", "options": {"temperature": 1e999}}' % MODEL, "options.temperature"),
    (GEN, '{"model": "%s", "prompt": "x", "options": {"top_p": -Infinity}}' % MODEL, "options.top_p"),
    (GEN, '{"model": "%s", "prompt": "x", "keep_alive": 1e999}' % MODEL, "keep_alive"),
    (GEN, '{"model": "%s", "prompt": "x", "options": {"seed": 1e30}}' % MODEL, "options.seed"),
    (GEN, '{"model": "%s", "prompt": "x", "context": [1%s]}' % (MODEL, "0" * 5000), "JSON"),
    (OCHAT, '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": 1e999}' % MODEL,
     "temperature"),
    (OCOMP, '{"model": "%s", "prompt": "x", "frequency_penalty": NaN}' % MODEL, "frequency_penalty"),
]


@pytest.mark.parametrize("case", RAW, ids=[f"{e}-{w}" for e, b, w in RAW])
async def test_numbers_json_cannot_hold_are_400(stack, case):
    endpoint, text, word = case
    async with stack.client() as http:
        r = await http.post(endpoint, content=text)
    assert r.status_code == 400, r.text[:500]
    assert word in message_of(endpoint, r)


async def test_the_stack_still_serves_after_the_table(stack):
    """Nothing in the table reached the engine's sampler or broke the worker; the extremes
    that are allowed work."""
    async with stack.client() as http:
        r = await http.post(GEN, json={**P, "stream": False, "options": {"seed": 2**63 - 1, "temperature": 2}})
        assert r.status_code == 200 and r.json()["done"] is True
        assert stack.engine.last_sampling.seed == 2**63 - 1 and stack.engine.last_sampling.temperature == 2
        r = await http.post(OCHAT, json={**C, "seed": 2**63 - 1, "n": N_LIMIT, "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == N_LIMIT
        assert -(2**63) <= stack.engine.last_sampling.seed < 2**63  # seed + i wraps within 64 bits
        r = await http.post(GEN, json={**P, "stream": False, "context": [1, 2, VOCAB_SIZE - 1], "keep_alive": "8760h"})
        assert r.status_code == 200
        r = await http.post(GEN, json={**P, "stream": False, "keep_alive": -1e300})  # negative: forever
        assert r.status_code == 200
        await stack.redis.delete(keys.keep_alive(MODEL))


async def test_every_openai_tool_choice_form_works(stack):
    tools = [TOOL, {**TOOL, "function": {**TOOL["function"], "name": "g"}}]
    named = {"type": "function", "function": {"name": "g"}}
    forms = ["none", "auto", "required", named,
             {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [named]}},
             {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [named]}}]
    async with stack.client() as http:
        for form in forms:
            for stream in (False, True):
                r = await http.post(OCHAT, json={**C, "tools": tools, "tool_choice": form, "stream": stream,
                                                 "max_tokens": 4})
                assert r.status_code == 200, (form, r.text)
        # allowed_tools narrows the tools: only "g" may be called.
        r = await http.post(OCHAT, json={**C, "tools": tools, "max_tokens": 4, "tool_choice": forms[4]})
        schema = stack.engine.last_sampling.json_schema
        assert r.status_code == 200 and [a["properties"]["name"]["enum"] for a in schema["items"]["anyOf"]] == [["g"]]


async def test_a_body_over_the_limit_is_413_also_without_content_length(stack):
    """A chunked body has no length to check up front: the bytes are counted as they come."""
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(REQUEST_LIMIT // 4096 + 2):
            yield b"x" * 4096
        yield b'"}'

    async with stack.client() as http:
        r = await http.post(GEN, content=chunks())
        assert r.status_code == 413 and "VLLAMA_MAX_REQUEST_BYTES" in r.json()["error"]
        assert "content-length" not in r.request.headers
        r = await http.post(OCOMP, content=chunks())
        assert r.status_code == 413 and "VLLAMA_MAX_REQUEST_BYTES" in r.json()["error"]["message"]
        # Just under the limit, chunked: read whole (and then refused for its prompt, not its body).
        small = json.dumps({**P, "prompt": "x" * (REQUEST_LIMIT - 200)}).encode()

        async def under() -> AsyncIterator[bytes]:
            for i in range(0, len(small), 4096):
                yield small[i:i + 4096]

        r = await http.post(GEN, content=under())
        assert r.status_code == 413 and "VLLAMA_MAX_PROMPT_BYTES" in r.json()["error"]


async def test_file_uploads_are_not_held_to_the_request_limit(stack):
    """POST /v1/files has its own, larger limit (VLLAMA_MAX_UPLOAD_BYTES)."""
    line = json.dumps({"custom_id": "a", "method": "POST", "url": OCOMP, "body": {**P, "max_tokens": 1}})
    data = ((line + "\n") * (2 * REQUEST_LIMIT // len(line))).encode()
    async with stack.client() as http:
        r = await http.post("/v1/files", files={"file": ("big.jsonl", data)}, data={"purpose": "batch"})
        assert r.status_code == 200, r.text[:300]
        assert r.json()["bytes"] == len(data)


async def test_ps_survives_an_absurd_keep_alive_stored_before_the_fix(stack):
    """A keep_alive of 1e300 (or inf, nan) written before keep_alive was bounded is still in
    Redis: the worker's expiry becomes absurd, and /api/ps must still answer, showing forever."""
    async with stack.client() as http:
        for stored in ("1e300", "inf", "nan"):
            await stack.redis.set(keys.keep_alive(MODEL), stored)

            async def absurd() -> bool:
                [worker] = await registry.live_workers(stack.redis)
                expires = worker.status_of(MODEL).expires_at
                return expires is not None and not expires < 1e12  # nan, inf or past year 33658

            await async_wait_until(absurd, 10, f"the worker to take keep_alive {stored}")
            r = await http.get("/api/ps")
            assert r.status_code == 200, r.text
            [entry] = r.json()["models"]
            assert 2300 < datetime.fromisoformat(entry["expires_at"].replace("Z", "+00:00")).year < 2400
    await stack.redis.delete(keys.keep_alive(MODEL))


async def test_tokenizing_a_large_prompt_does_not_block_the_worker(stack):
    """A prompt just under VLLAMA_MAX_PROMPT_BYTES is tokenized in a thread: while it is, the
    worker's event loop serves another job to the end and its heartbeat goes on."""
    engine: SlowTokenizer = stack.engine
    engine.slow_started.clear(), engine.release.clear(), engine.returned.clear()
    big = SLOW + "x" * (PROMPT_LIMIT - len(SLOW) - 64)
    async with stack.client() as http:
        slow = asyncio.create_task(http.post(GEN, json={**P, "prompt": big, "raw": True, "stream": False}))
        try:
            async def tokenizing() -> bool:
                return engine.slow_started.is_set()

            await async_wait_until(tokenizing, 20, "the large prompt's tokenizing to begin")
            [before] = await registry.live_workers(stack.redis)
            short = await http.post(GEN, json={**P, "stream": False})
            assert short.status_code == 200 and short.json()["done"] is True
            assert not engine.returned.is_set(), "the short job ended only after the large prompt was tokenized"

            async def beat() -> bool:
                [now] = await registry.live_workers(stack.redis)
                return now.heartbeat_at > before.heartbeat_at and now.state == "ready"

            await async_wait_until(beat, 10, "a heartbeat while the large prompt is tokenized")
        finally:
            engine.release.set()
        r = await slow
    assert r.status_code == 200 and r.json()["prompt_eval_count"] == len(big)


async def test_ps_expiry_is_clamped():
    """The rendering itself, for the values a worker could hold."""
    from api.model_wire import _expiry

    now = datetime.fromtimestamp(time.time()).astimezone()
    for absurd in (1e300, math.inf, math.nan, 2**62 * 1.0):
        assert _expiry(now, [absurd]).year > 2300
    assert _expiry(now, [None, 5.0]).year > 2300
    assert _expiry(now, [now.timestamp() + 60]).timestamp() == pytest.approx(now.timestamp() + 60)
