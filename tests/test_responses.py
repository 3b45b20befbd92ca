"""OpenAI's Responses API over the same queue and workers, with the fake engine (real Redis,
real HTTP) and the official `openai` client: whole responses, the typed event stream and the
SDK's stream helper, stored responses (GET, DELETE, previous_response_id), function calls,
reasoning, structured output and errors. tests/e2e runs the client against real vLLM."""

from __future__ import annotations

import json

import openai
import pytest

from tests.fake_stack import MODEL, fake_stack
from tests.test_thinking import ANSWER, THOUGHT, thinking_stack
from tests.test_tool_calls import ASK, HERMES_REPLY, tools_stack, wait_catalogued

pytestmark = pytest.mark.asyncio(loop_scope="session")

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object",
                                                                "properties": {"zone": {"type": "string"}}}}
EXPECTED_16 = "".join(f"tok{i} " for i in range(16))


def client_of(stack, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key=kw.pop("api_key", "unused"), **kw)


async def test_a_whole_response(redis_server):
    async with fake_stack(redis_server.url) as stack:
        client = client_of(stack)
        r = await client.responses.create(model=MODEL, input="hi", instructions="Be brief.", max_output_tokens=5)
        assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
        assert r.output_text == "tok0 tok1 tok2 tok3 tok4 "
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert [item.type for item in r.output] == ["message"] and r.output[0].role == "assistant"
        assert r.usage.output_tokens == 5
        assert r.usage.input_tokens == len("<system>Be brief.<user>hi<assistant>")  # the fake engine counts chars
        assert stack.engine.last_chat[0][0] == {"role": "system", "content": "Be brief."}

        r = await client.responses.create(model=MODEL, temperature=0.5, top_p=0.9, input=[
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}])
        assert r.status == "completed" and r.output_text == EXPECTED_16 and r.incomplete_details is None
        assert [m["role"] for m in stack.engine.last_chat[0]] == ["system", "user"]
        sampling = stack.engine.last_sampling
        assert (sampling.temperature, sampling.top_p, sampling.max_tokens) == (0.5, 0.9, None)

        schema = {"type": "object", "properties": {"city": {"type": "string"}}}
        await client.responses.create(model=MODEL, input="hi", text={"format": {
            "type": "json_schema", "name": "place", "schema": schema}})
        assert stack.engine.last_sampling.json_schema == schema  # what vLLM's structured outputs enforce
        await client.close()


async def test_the_event_stream_and_the_sdks_stream_helper(redis_server):
    async with fake_stack(redis_server.url) as stack:
        client = client_of(stack)
        events = [e async for e in await client.responses.create(model=MODEL, input="hi", stream=True)]
        kinds = [e.type for e in events]
        assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.content_part.added", "response.output_text.delta"]
        assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                              "response.output_item.done", "response.completed"]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == EXPECTED_16
        final = events[-1].response
        assert final.output_text == EXPECTED_16 and final.usage.output_tokens == 16 and final.status == "completed"

        async with client.responses.stream(model=MODEL, input="hi", max_output_tokens=20) as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            done = await stream.get_final_response()
        assert "".join(deltas) == EXPECTED_16 == done.output_text and done.status == "completed"
        # Streamed responses are stored as the whole ones are.
        assert (await client.responses.retrieve(done.id)).output_text == EXPECTED_16

        # Cut short by max_output_tokens: the stream ends with response.incomplete, as OpenAI's does.
        events = [e async for e in await client.responses.create(model=MODEL, input="hi", stream=True,
                                                                 max_output_tokens=3)]
        assert events[-1].type == "response.incomplete"
        assert events[-1].response.incomplete_details.reason == "max_output_tokens"
        assert events[-1].response.output_text == "tok0 tok1 tok2 "
        await client.close()


async def test_stored_responses_continue_a_conversation(redis_server):
    async with fake_stack(redis_server.url) as stack:
        client = client_of(stack)
        first = await client.responses.create(model=MODEL, input="first", instructions="Be brief.",
                                              max_output_tokens=2)
        second = await client.responses.create(model=MODEL, input="second", previous_response_id=first.id,
                                               max_output_tokens=2)
        assert second.previous_response_id == first.id
        # The history, without the first request's instructions (they are not carried on).
        assert stack.engine.last_chat[0] == [{"role": "user", "content": "first"},
                                             {"role": "assistant", "content": "tok0 tok1 "},
                                             {"role": "user", "content": "second"}]
        await client.responses.create(model=MODEL, input="third", previous_response_id=second.id,
                                      instructions="Now be verbose.", max_output_tokens=2)
        assert [m["content"] for m in stack.engine.last_chat[0]] == [
            "Now be verbose.", "first", "tok0 tok1 ", "second", "tok0 tok1 ", "third"]

        got = await client.responses.retrieve(first.id)
        assert got.model_dump() == first.model_dump()
        deleted = await stack.client().delete(f"/v1/responses/{first.id}")
        assert deleted.json() == {"id": first.id, "object": "response", "deleted": True}
        with pytest.raises(openai.NotFoundError, match=first.id):
            await client.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):  # the chain is broken where the first one was
            await client.responses.create(model=MODEL, input="x", previous_response_id=second.id)

        unstored = await client.responses.create(model=MODEL, input="x", store=False, max_output_tokens=1)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(unstored.id)
        await client.close()


async def test_function_call_round_trip(redis_server, tmp_path):
    async with tools_stack(redis_server, tmp_path, HERMES_REPLY) as stack:
        await wait_catalogued(stack)
        client = client_of(stack)
        r = await client.responses.create(model=MODEL, input=ASK, tools=[WEATHER, TIME])
        assert [item.type for item in r.output] == ["message", "function_call", "function_call"]
        assert r.output_text == "Let me check.\n"
        calls = r.output[1:]
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
        assert stack.engine.last_chat[1][0]["function"]["parameters"] == WEATHER["parameters"]

        await client.responses.create(model=MODEL, previous_response_id=r.id, tools=[WEATHER, TIME], input=[
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
            {"type": "function_call_output", "call_id": calls[1].call_id, "output": "14:00"}])
        rendered = stack.engine.last_chat[0]
        assert [m["role"] for m in rendered] == ["user", "assistant", "tool", "tool"]
        assert [c["id"] for c in rendered[1]["tool_calls"]] == [calls[0].call_id, calls[1].call_id]
        assert rendered[2] == {"role": "tool", "content": "sunny", "tool_call_id": calls[0].call_id,
                               "name": "get_weather"}

        # The same history sent whole, as clients that keep it themselves (store: false) do.
        await client.responses.create(model=MODEL, tools=[WEATHER, TIME], store=False, input=[
            *ASK, *[c.model_dump() for c in calls],
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
        assert [m["role"] for m in stack.engine.last_chat[0]] == ["user", "assistant", "tool"]

        events = [e async for e in await client.responses.create(model=MODEL, input=ASK, tools=[WEATHER, TIME],
                                                                  stream=True)]
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert [(e.name, json.loads(e.arguments)) for e in done] == [
            ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
        assert [i.type for i in events[-1].response.output] == ["message", "function_call", "function_call"]
        await client.close()


async def test_reasoning_items(redis_server, tmp_path):
    async with thinking_stack(redis_server, tmp_path) as stack:
        await wait_catalogued(stack)
        client = client_of(stack)
        r = await client.responses.create(model=MODEL, input=ASK, reasoning={"effort": "high"})
        assert [item.type for item in r.output] == ["reasoning", "message"]
        assert (r.output[0].content[0].text, r.output_text) == (THOUGHT, ANSWER)
        assert stack.engine.last_template_kwargs["enable_thinking"] is True

        async with client.responses.stream(model=MODEL, input=ASK) as stream:
            kinds = [e.type async for e in stream if e.type.endswith(".delta")]
            final = await stream.get_final_response()
        assert kinds[0] == "response.reasoning_text.delta" and kinds[-1] == "response.output_text.delta"
        assert (final.output[0].content[0].text, final.output_text) == (THOUGHT, ANSWER)

        # Continued: the reasoning goes back with the answer it led to.
        await client.responses.create(model=MODEL, input="And 3+3?", previous_response_id=final.id,
                                      reasoning={"effort": "none"})
        assert stack.engine.last_chat[0][1]["reasoning_content"] == THOUGHT
        assert stack.engine.last_template_kwargs["enable_thinking"] is False
        await client.close()


@pytest.mark.parametrize(("body", "message"), [
    ({"input": []}, "non-empty list"),
    ({"input": [{"type": "file_search_call", "id": "x"}]}, "'file_search_call' are not supported"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "built-in tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "'input_file'"),
    ({"input": "hi", "previous_response_id": "resp_nope"}, "resp_nope"),
    ({"input": "hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
])
async def test_bad_requests_say_what_is_wrong(redis_server, body, message):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/v1/responses", json={"model": MODEL, **body})
        assert r.status_code in (400, 404) and message in r.json()["error"]["message"], r.text
        r = await http.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2})
        assert r.status_code == 200  # nothing else was harmed


async def test_a_keys_responses_are_its_own(redis_server, tmp_path):
    keys = tmp_path / "keys"
    from common.api_keys import hash_key
    keys.write_text(f"alice {hash_key('key-a')}\nbob {hash_key('key-b')}\n")
    async with fake_stack(redis_server.url, api_keys=str(keys)) as stack:
        alice, bob = client_of(stack, api_key="key-a"), client_of(stack, api_key="key-b")
        r = await alice.responses.create(model=MODEL, input="secret", max_output_tokens=1)
        assert (await alice.responses.retrieve(r.id)).id == r.id
        with pytest.raises(openai.NotFoundError):
            await bob.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            await bob.responses.create(model=MODEL, input="x", previous_response_id=r.id)
        await alice.close()
        await bob.close()
