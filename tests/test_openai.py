"""The OpenAI API over the same queue and workers, with the fake engine (real Redis, real
HTTP): SSE framing, usage, errors in OpenAI's shape. tests/e2e runs the official `openai`
client against real vLLM."""

from __future__ import annotations

import json

import ollama
import openai
import pytest

from tests.fake_stack import MODEL, fake_stack

pytestmark = pytest.mark.asyncio(loop_scope="session")

EXPECTED_16 = "".join(f"tok{i} " for i in range(16))


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


async def test_chat_completion_streaming_sse_shape(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/v1/chat/completions", json={
            "model": MODEL, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == EXPECTED_16
        finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 16


async def test_official_client_chat_and_completions(redis_server):
    async with fake_stack(redis_server.url) as stack:
        client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused")
        r = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5)
        assert r.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 5 and r.usage.total_tokens == r.usage.prompt_tokens + 5

        parts = [c async for c in await client.completions.create(model=MODEL, prompt="abc", max_tokens=3,
                                                                   stream=True)]
        assert "".join(p.choices[0].text for p in parts if p.choices) == "tok0 tok1 tok2 "
        whole = await client.completions.create(model=MODEL, prompt="abc", max_tokens=3)
        assert whole.choices[0].text == "tok0 tok1 tok2 " and whole.object == "text_completion"

        models = await client.models.list()
        assert MODEL in [m.id for m in models.data]
        assert (await client.models.retrieve(MODEL)).id == MODEL
        await client.close()


async def test_errors_use_openai_error_objects(redis_server):
    async with fake_stack(redis_server.url) as stack:
        client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError) as err:
            await client.chat.completions.create(model="nowhere:1b", messages=[{"role": "user", "content": "x"}])
        assert err.value.body["code"] == "model_not_found" and "ollama pull" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                 temperature=5)
        assert err.value.body["type"] == "invalid_request_error" and "temperature" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model=MODEL, messages=[])
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nowhere:1b")
        await client.close()
        async with stack.client() as http:
            r = await http.post("/v1/chat/completions", content=b"{not json")
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
            # The Ollama endpoints keep Ollama's shape.
            r = await http.post("/api/generate", content=b"{not json")
            assert isinstance(r.json()["error"], str)


async def test_bearer_key_when_configured(redis_server):
    async with fake_stack(redis_server.url, api_key="s3cret") as stack, stack.client() as http:
        assert (await http.get("/")).status_code == 200  # health checks need no key
        assert (await http.get("/health")).status_code == 200
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False})
        assert r.status_code == 401 and "VLLAMA_API_KEY" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
        r = await http.get("/api/tags", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "wrong API key" in r.json()["error"]
        r = await http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"

        # The official clients, with the key.
        ollama_client = ollama.AsyncClient(host=stack.base_url, headers={"Authorization": "Bearer s3cret"})
        r = await ollama_client.generate(model=MODEL, prompt="x", options={"num_predict": 2})
        assert r.response == "tok0 tok1 "
        client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="s3cret")
        r = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=2)
        assert r.choices[0].message.content == "tok0 tok1 "
        bad = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
        await client.close()
        await bad.close()


async def test_logprobs_in_both_apis_streaming_and_not(redis_server):
    """The fake engine's tokens are its pieces at -0.25, then alt1, alt2, ... below them."""
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused")
        r = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, logprobs=True, top_logprobs=2)
        content = r.choices[0].logprobs.content
        assert [c.token for c in content] == ["tok0 ", "tok1 ", "tok2 "] and content[0].logprob == -0.25
        assert [(t.token, t.logprob) for t in content[1].top_logprobs] == [("tok1 ", -0.25), ("alt1", -2.0)]
        assert content[0].bytes == list(b"tok0 ")
        chunks = [c async for c in await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True, stream=True)]
        streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        assert [t.token for t in streamed] == ["tok0 ", "tok1 ", "tok2 "] and all(not t.top_logprobs for t in streamed)
        plain = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=3)
        assert plain.choices[0].logprobs is None

        legacy = await client.completions.create(model=MODEL, prompt="abc", max_tokens=3, logprobs=2)
        lp = legacy.choices[0].logprobs
        assert lp.tokens == ["tok0 ", "tok1 ", "tok2 "] and lp.token_logprobs == [-0.25] * 3
        assert lp.text_offset == [0, 5, 10] and lp.top_logprobs[2] == {"tok2 ": -0.25, "alt1": -2.0}
        parts = [c async for c in await client.completions.create(model=MODEL, prompt="abc", max_tokens=3,
                                                                   logprobs=0, stream=True)]
        assert [o for p in parts if p.choices and p.choices[0].logprobs for o in p.choices[0].logprobs.text_offset] \
            == [0, 5, 10]
        await client.close()

        ollama_client = ollama.AsyncClient(host=stack.base_url)
        g = await ollama_client.generate(model=MODEL, prompt="hi", options={"num_predict": 2}, logprobs=True,
                                         top_logprobs=1)
        assert [(x.token, x.logprob, [t.token for t in x.top_logprobs]) for x in g.logprobs] == [
            ("tok0 ", -0.25, ["tok0 "]), ("tok1 ", -0.25, ["tok1 "])]
        chunks = [c async for c in await ollama_client.chat(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                             options={"num_predict": 2}, logprobs=True, stream=True)]
        assert [x.token for c in chunks for x in c.logprobs or []] == ["tok0 ", "tok1 "]

        for body, message in [({"logprobs": True, "top_logprobs": 21}, "between 0 and 20"),
                              ({"top_logprobs": 2}, "needs logprobs")]:
            r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user",
                                                                                             "content": "x"}], **body})
            assert r.status_code == 400 and message in r.json()["error"]["message"]
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 6})
        assert r.status_code == 400 and "between 0 and 5" in r.json()["error"]["message"]
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "x", "logprobs": True, "top_logprobs": 21})
        assert r.status_code == 400 and r.json() == {"error": "top_logprobs must be between 0 and 20"}


async def test_n_choices_and_several_prompts(redis_server):
    """One job per choice: they run side by side, and every choice comes back once, in order."""
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused")
        r = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=2, n=3, seed=7)
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert all(c.message.content == "tok0 tok1 " for c in r.choices)
        assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == r.usage.total_tokens - 6
        single = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=2)
        assert r.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counted once

        chunks = [c async for c in await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=2, stream=True,
            stream_options={"include_usage": True})]
        texts: dict[int, str] = {}
        finishes: dict[int, str] = {}
        for c in chunks:
            for choice in c.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
                if choice.finish_reason:
                    assert choice.index not in finishes
                    finishes[choice.index] = choice.finish_reason
        assert texts == {0: "tok0 tok1 ", 1: "tok0 tok1 "} and finishes == {0: "length", 1: "length"}
        assert chunks[-1].usage.completion_tokens == 4

        legacy = await client.completions.create(model=MODEL, prompt=["a", "bb"], max_tokens=1, n=2)
        assert [(c.index, c.text) for c in legacy.choices] == [(i, "tok0 ") for i in range(4)]
        assert legacy.usage.prompt_tokens == 1 + 2 and legacy.usage.completion_tokens == 4
        await client.close()

        seeds = []
        original = stack.engine.generate

        def spy(request_id, prompt, sampling, *args, **kwargs):
            seeds.append(sampling.seed)
            return original(request_id, prompt, sampling, *args, **kwargs)

        stack.engine.generate = spy
        await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1, "n": 3, "seed": 10})
        assert sorted(seeds) == [10, 11, 12]  # different, reproducible choices
        for body, status, message in [({"n": 0}, 400, "at least 1"), ({"n": 129}, 413, "VLLAMA_MAX_N"),
                                      ({"n": 16, "prompt": ["a"] * 9}, 400, "more than 128 choices")]:
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", **body})
            assert r.status_code == status and message in r.json()["error"]["message"], r.text
