"""The official `openai` package against the real stack and real vLLM."""

from __future__ import annotations

import json

import openai
import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(stack):
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)


def test_chat_completion_and_stream(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                       max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length") and 0 < r.usage.completion_tokens <= 16

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content  # greedy: the same answer streamed
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completion_continues_raw_text(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage.prompt_tokens >= 5
    parts = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                           temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text


def test_json_schema_output_parses(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    # Greedy and with room to finish: the schema is enforced token by token, but a length
    # limit (or a sampled rambling string) can still cut the object short.
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Invent a person. Answer in JSON."}], max_tokens=200,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    person = json.loads(r.choices[0].message.content)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


def test_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model:1b", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=0)
    assert MODEL in [m.id for m in client.models.list().data]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_call_round_trip_with_a_named_function(client):
    """A named function is enforced with structured outputs: even a 135M model calls it with
    arguments that fit its schema; the result goes back as a tool message and is answered."""
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                       max_tokens=64, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert isinstance(json.loads(call.function.arguments)["city"], str)

    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"weather": "sunny", "celsius": 21}'}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME], temperature=0,
                                            max_tokens=32)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


def test_required_tool_calls_streamed(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                                 max_tokens=96, tool_choice="required", stream=True))
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert calls and [c.index for c in calls] == list(range(len(calls)))
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in calls:
        arguments = json.loads(call.function.arguments)
        assert set(arguments) == set(schemas[call.function.name]["properties"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def few_shot_weather(cities: list[str]) -> list[dict]:
    """Earlier turns in which the assistant called get_weather: a 135M model, greedy, copies
    the pattern, so "auto" yields a real call written by the model and read by vLLM's parser."""
    turns = []
    for i, city in enumerate(cities):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
        turns += [{"role": "user", "content": f"What is the weather in {city}?"},
                  {"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": f"call_{i}", "content": "sunny"},
                  {"role": "assistant", "content": f"It is sunny in {city}."}]
    return turns


SHOTS = few_shot_weather(["Berlin", "Madrid", "Rome", "Lisbon", "Vienna"])


def test_auto_tool_call_written_by_the_model(client):
    messages = [*SHOTS, *ASK]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert "<tool_call>" not in (choice.message.content or "")

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0,
                                                 max_tokens=40, stream=True))
    streamed = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert [(t.function.name, json.loads(t.function.arguments)) for t in streamed] == [("get_weather", {"city": "Paris"})]
    assert "<tool_call>" not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_logprobs_are_the_models(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                       max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        top = [t.logprob for t in c.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True) and all(lp <= 0 for lp in top)
        # Greedy: the chosen token is the likeliest (or tied with it).
        assert c.logprob == top[0] and c.token in [t.token for t in c.top_logprobs if t.logprob == top[0]]


def test_n_choices_sample_independently(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                       max_tokens=12, temperature=1.0, seed=42, n=3)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and all(texts)
    assert len(set(texts)) > 1  # seeds 42, 43, 44: three different samples
    assert 3 <= r.usage.completion_tokens <= 36
    legacy = client.completions.create(model=MODEL, prompt=["The sky is", "Water is"], max_tokens=4, temperature=0)
    assert [c.index for c in legacy.choices] == [0, 1] and all(c.text for c in legacy.choices)


# The Responses API's function tools are flat: no "function" object around them.
FLAT_WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_responses_text_stream_and_continuation(client):
    r = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=16, temperature=0)
    assert r.output_text.strip() and r.status in ("completed", "incomplete") and 0 < r.usage.output_tokens <= 16
    with client.responses.stream(model=MODEL, input="Say hello.", max_output_tokens=200, temperature=0) as stream:
        streamed = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert streamed == final.output_text and final.output_text.startswith(r.output_text)

    more = client.responses.create(model=MODEL, input="Say it again.", previous_response_id=r.id,
                                   max_output_tokens=8, temperature=0)
    # The stored turn went back to the model: the prompt holds both questions and the answer.
    assert more.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens
    assert client.responses.retrieve(more.id).output_text == more.output_text


def test_responses_function_call_round_trip(client):
    called = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[FLAT_WEATHER],
                                     tool_choice={"type": "function", "name": "get_weather"})
    [call] = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    answer = client.responses.create(model=MODEL, previous_response_id=called.id, tools=[FLAT_WEATHER],
                                     max_output_tokens=32, temperature=0, input=[
                                         {"type": "function_call_output", "call_id": call.call_id,
                                          "output": "sunny, 21 C"}])
    assert answer.output and answer.usage.input_tokens > called.usage.input_tokens
