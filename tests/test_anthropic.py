"""Anthropic's Messages API over the same queue and workers, with the fake engine (real Redis,
real HTTP) and the official `anthropic` client: whole messages, the event stream and the SDK's
stream helpers, tool use round trips, thinking, images, count_tokens, errors and keys in
Anthropic's shape. tests/e2e runs the client against real vLLM."""

from __future__ import annotations

import json

import anthropic
import pytest

from tests.fake_stack import MODEL, fake_stack
from tests.test_images import b64, png
from tests.test_thinking import ANSWER, THOUGHT, thinking_stack
from tests.test_tool_calls import HERMES_REPLY, tools_stack, wait_catalogued
from workers.fake_engine import FakeEngine

pytestmark = pytest.mark.asyncio(loop_scope="session")

ASK = [{"role": "user", "content": "Weather and time in Paris?"}]
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}}}
EXPECTED_16 = "".join(f"tok{i} " for i in range(16))


def client_of(stack, **kw) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=stack.base_url, api_key=kw.pop("api_key", "unused"), **kw)


def sse(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each event; every event has both lines."""
    out = []
    for block in text.split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        out.append((name_line[len("event: "):], json.loads(data_line[len("data: "):])))
    return out


async def test_a_whole_message_and_why_it_stopped(redis_server):
    async with fake_stack(redis_server.url) as stack:
        client = client_of(stack)
        m = await client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}],
                                         system="Be brief.")
        assert m.id.startswith("msg_") and m.role == "assistant" and m.model == MODEL
        assert [(b.type, b.text) for b in m.content] == [("text", "tok0 tok1 tok2 tok3 tok4 ")]
        assert m.stop_reason == "max_tokens" and m.stop_sequence is None
        assert m.usage.output_tokens == 5
        # The system prompt leads the conversation; the fake engine counts its characters.
        assert stack.engine.last_chat[0][0] == {"role": "system", "content": "Be brief."}
        assert m.usage.input_tokens == len("<system>Be brief.<user>hi<assistant>")

        # Sampling as older SDKs and other clients still send it (the current SDK dropped these).
        m = await client.messages.create(model=MODEL, max_tokens=100,
                                         messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                         extra_body={"temperature": 0.5, "top_k": 3, "top_p": 0.9})
        assert m.content[0].text == EXPECTED_16 and m.stop_reason == "end_turn"
        sampling = stack.engine.last_sampling
        assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.max_tokens) == (0.5, 3, 0.9, 100)
        assert sampling.json_schema is None

        schema = {"type": "object", "properties": {"city": {"type": "string"}}}
        await client.messages.create(model=MODEL, max_tokens=5, messages=ASK,
                                     output_config={"format": {"type": "json_schema", "schema": schema}})
        assert stack.engine.last_sampling.json_schema == schema  # what vLLM's structured outputs enforce
        await client.close()


async def test_the_event_stream_and_the_sdks_stream_helpers(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/v1/messages", json={"model": MODEL, "max_tokens": 100, "stream": True,
                                                  "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.text)
        assert all(name == data["type"] for name, data in events)
        names = [name for name, _ in events]
        assert names[:3] == ["message_start", "ping", "content_block_start"]
        assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
        assert set(names[3:-3]) == {"content_block_delta"}
        assert events[2][1]["content_block"] == {"type": "text", "text": ""}
        assert "".join(d["delta"]["text"] for _, d in events[3:-3]) == EXPECTED_16
        assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
        assert events[-2][1]["usage"]["output_tokens"] == 16

        client = client_of(stack)
        async with client.messages.stream(model=MODEL, max_tokens=4,
                                          messages=[{"role": "user", "content": "hi"}]) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "tok0 tok1 tok2 tok3 " == final.content[0].text
        assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 4
        assert final.usage.input_tokens == len("<user>hi<assistant>")
        await client.close()


async def test_tool_use_round_trip(redis_server, tmp_path):
    async with tools_stack(redis_server, tmp_path, HERMES_REPLY) as stack:
        await wait_catalogued(stack)
        client = client_of(stack)
        m = await client.messages.create(model=MODEL, max_tokens=200, messages=ASK, tools=[WEATHER, TIME])
        assert m.stop_reason == "tool_use"
        assert [b.type for b in m.content] == ["text", "tool_use", "tool_use"]
        assert m.content[0].text == "Let me check.\n"
        uses = m.content[1:]
        assert [(u.name, u.input) for u in uses] == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
        assert all(u.id.startswith("toolu_") for u in uses) and uses[0].id != uses[1].id
        # Rendered for the model as the function tools chat templates read.
        assert [t["function"]["name"] for t in stack.engine.last_chat[1]] == ["get_weather", "get_time"]
        assert stack.engine.last_chat[1][0]["function"]["parameters"] == WEATHER["input_schema"]

        # The results go back in a user turn; the model sees tool messages naming the call.
        history = [*ASK, {"role": "assistant", "content": [b.model_dump() for b in m.content]},
                   {"role": "user", "content": [
                       {"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"},
                       {"type": "tool_result", "tool_use_id": uses[1].id,
                        "content": [{"type": "text", "text": "no such zone"}], "is_error": True},
                       {"type": "text", "text": "Thanks!"}]}]
        await client.messages.create(model=MODEL, max_tokens=200, messages=history, tools=[WEATHER, TIME])
        rendered = stack.engine.last_chat[0]
        assert [m["role"] for m in rendered] == ["user", "assistant", "tool", "tool", "user"]
        assert rendered[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
        assert rendered[1]["tool_calls"][0]["id"] == uses[0].id
        assert rendered[2] == {"role": "tool", "content": "sunny", "tool_call_id": uses[0].id, "name": "get_weather"}
        assert rendered[3]["content"] == "Error: no such zone" and rendered[3]["name"] == "get_time"
        assert rendered[4] == {"role": "user", "content": "Thanks!"}

        # Streamed: each call is a tool_use block whose input arrives as JSON.
        async with client.messages.stream(model=MODEL, max_tokens=200, messages=ASK, tools=[WEATHER, TIME]) as s:
            final = await s.get_final_message()
        assert [(b.type, getattr(b, "input", None)) for b in final.content] == [
            ("text", None), ("tool_use", {"city": "Paris"}), ("tool_use", {"zone": "CET"})]
        assert final.stop_reason == "tool_use"
        await client.close()


@pytest.mark.parametrize(("choice", "reply", "expected"), [
    ({"type": "any"}, '[{"name": "get_time", "parameters": {"zone": "UTC"}}]', [("get_time", {"zone": "UTC"})]),
    ({"type": "tool", "name": "get_weather"}, '{"city": "Oslo"}', [("get_weather", {"city": "Oslo"})]),
])
async def test_tool_choice_any_and_named_force_a_call(redis_server, choice, reply, expected):
    async with fake_stack(redis_server.url, engine=FakeEngine(reply=reply)) as stack:
        client = client_of(stack)
        m = await client.messages.create(model=MODEL, max_tokens=100, messages=ASK, tools=[WEATHER, TIME],
                                         tool_choice=choice)
        assert m.stop_reason == "tool_use" and [(b.name, b.input) for b in m.content] == expected
        assert stack.engine.last_sampling.json_schema is not None  # the call's JSON, enforced
        await client.close()


async def test_thinking_blocks(redis_server, tmp_path):
    async with thinking_stack(redis_server, tmp_path) as stack:
        await wait_catalogued(stack)
        client = client_of(stack)
        m = await client.messages.create(model=MODEL, max_tokens=200, messages=ASK,
                                         thinking={"type": "enabled", "budget_tokens": 1024})
        assert [b.type for b in m.content] == ["thinking", "text"]
        assert (m.content[0].thinking, m.content[1].text) == (THOUGHT, ANSWER)
        assert stack.engine.last_template_kwargs["enable_thinking"] is True

        async with client.messages.stream(model=MODEL, max_tokens=200, messages=ASK) as stream:
            kinds = [e.delta.type async for e in stream if e.type == "content_block_delta"]
            final = await stream.get_final_message()
        assert kinds[0] == "thinking_delta" and kinds[-1] == "text_delta"
        assert (final.content[0].thinking, final.content[1].text) == (THOUGHT, ANSWER)

        # The thinking goes back with the history; "disabled" asks the template not to think.
        history = [*ASK, {"role": "assistant", "content": [b.model_dump() for b in final.content]},
                   {"role": "user", "content": "And 3+3?"}]
        await client.messages.create(model=MODEL, max_tokens=200, messages=history, thinking={"type": "disabled"})
        assert stack.engine.last_chat[0][1]["reasoning_content"] == THOUGHT
        assert stack.engine.last_template_kwargs["enable_thinking"] is False
        await client.messages.create(model=MODEL, max_tokens=200, messages=ASK, thinking={"type": "adaptive"})
        assert stack.engine.last_template_kwargs == {}  # the model's own default
        await client.close()


async def test_image_blocks_reach_the_engine(redis_server):
    async with fake_stack(redis_server.url, engine=FakeEngine(vision=True)) as stack:
        client = client_of(stack)
        await client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(png(4, 3))}},
            {"type": "text", "text": "What is this?"}]}])
        assert [image.size for image in stack.engine.last_images] == [(4, 3)]
        with pytest.raises(anthropic.BadRequestError, match="VLLAMA_FETCH_IMAGES"):
            await client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": "http://127.0.0.1:9/cat.png"}}]}])
        await client.close()


async def test_count_tokens_renders_without_generating(redis_server):
    async with fake_stack(redis_server.url) as stack:
        client = client_of(stack)
        started = len(stack.engine.started)
        count = await client.messages.count_tokens(model=MODEL, system="Be brief.",
                                                   messages=[{"role": "user", "content": "hi"}])
        assert count.input_tokens == len("<system>Be brief.<user>hi<assistant>")
        assert len(stack.engine.started) == started  # the engine was not asked
        await client.close()


async def test_errors_in_anthropics_shape(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/v1/messages", json={"model": MODEL, "messages": ASK})
        assert r.status_code == 400
        assert r.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                       "message": "max_tokens: Field required"}}
        r = await http.post("/v1/messages", json={"model": MODEL, "max_tokens": 9, "messages": [
            {"role": "user", "content": [{"type": "document", "source": {}}]}]})
        assert r.status_code == 400 and "'document' are not supported" in r.json()["error"]["message"]
        r = await http.post("/v1/messages", json={"model": MODEL, "max_tokens": 9, "messages": ASK,
                                                  "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
        assert r.status_code == 400 and "server tools" in r.json()["error"]["message"]

        client = client_of(stack)
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.messages.create(model="nope:1b", max_tokens=5, messages=ASK)
        assert missing.value.body["error"]["type"] == "not_found_error"
        with pytest.raises(anthropic.BadRequestError, match="temperature"):
            await client.messages.create(model=MODEL, max_tokens=5, messages=ASK, extra_body={"temperature": 1.5})
        await client.close()
        # Nothing else was harmed: the next request runs.
        r = await http.post("/v1/messages", json={"model": MODEL, "max_tokens": 2, "messages": ASK})
        assert r.status_code == 200 and r.json()["content"][0]["text"] == "tok0 tok1 "


async def test_the_sdks_x_api_key_header_is_a_key(redis_server):
    async with fake_stack(redis_server.url, api_key="s3cret") as stack:
        good = client_of(stack, api_key="s3cret")  # the SDK sends x-api-key
        m = await good.messages.create(model=MODEL, max_tokens=2, messages=ASK)
        assert m.content[0].text == "tok0 tok1 "
        bad = client_of(stack, api_key="wrong")
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await bad.messages.create(model=MODEL, max_tokens=2, messages=ASK)
        assert refused.value.body["error"]["type"] == "authentication_error"
        assert "x-api-key" in refused.value.body["error"]["message"]
        await good.close()
        await bad.close()
