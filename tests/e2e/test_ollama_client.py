"""The official `ollama` Python package as the client: what its users call must just work."""

from __future__ import annotations

import json

import ollama
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.test_openai_client import SHOTS, WEATHER

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(stack):
    return ollama.Client(host=stack.base_url)


def test_generate(client):
    r = client.generate(model=MODEL, prompt="Why is the sky blue?", options={"num_predict": 12})
    assert r.done and r.response and r.eval_count and r.done_reason in ("stop", "length")
    assert r.context and r.total_duration > 0


def test_generate_streaming(client):
    parts = list(client.generate(model=MODEL, prompt="Hi", stream=True, options={"num_predict": 8}))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts).strip()


def test_chat_and_streaming_chat(client):
    messages = [{"role": "user", "content": "Say hello."}]
    r = client.chat(model=MODEL, messages=messages, options={"num_predict": 10, "temperature": 0})
    assert r.message.role == "assistant" and r.message.content
    parts = list(client.chat(model=MODEL, messages=messages, stream=True, options={"num_predict": 10, "temperature": 0}))
    assert "".join(p.message.content for p in parts) == r.message.content
    assert parts[-1].done and parts[-1].eval_count == r.eval_count


def test_chat_with_format_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Name a city."}], format=schema,
                    options={"temperature": 0, "num_predict": 40})
    import json

    assert "city" in json.loads(r.message.content)


def test_missing_model_raises_response_error_404(client):
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404
    assert "not found, try pulling it first" in info.value.error


def test_load_with_empty_prompt(client):
    r = client.generate(model=MODEL)
    assert r.done and r.done_reason == "load"


def test_generate_with_logprobs(client):
    r = client.generate(model=MODEL, prompt="Why is the sky blue?", logprobs=True, top_logprobs=2,
                        options={"num_predict": 6, "temperature": 0})
    assert len(r.logprobs) == r.eval_count and "".join(x.token for x in r.logprobs) == r.response
    assert all(len(x.top_logprobs) == 2 and x.top_logprobs[0].logprob >= x.top_logprobs[1].logprob for x in r.logprobs)


def test_chat_with_tools_and_a_tool_result(client):
    """The bundled model's template renders tools, calls and results; with "auto" the model
    may or may not call a tool, so the answer is checked for shape, not content."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "tool_name": "get_weather", "content": "sunny, 21 C"}]
    r = client.chat(model=MODEL, messages=history, tools=tools, options={"num_predict": 24, "temperature": 0})
    assert r.done and (r.message.content or r.message.tool_calls)
    assert r.prompt_eval_count > 150  # the tool signature and the call's history were rendered
    for call in r.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)


def test_chat_auto_tool_call_written_by_the_model(client):
    """The few-shot history of tests/e2e/test_openai_client.py in Ollama's shapes (arguments
    as objects, results named by tool): the model calls the tool, Ollama-style."""
    history = []
    for m in SHOTS:
        if m.get("tool_calls"):
            history.append({"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]]})
        elif m["role"] == "tool":
            history.append({"role": "tool", "tool_name": "get_weather", "content": m["content"]})
        else:
            history.append(m)
    history.append({"role": "user", "content": "What is the weather in Paris?"})
    r = client.chat(model=MODEL, messages=history, tools=[WEATHER], options={"num_predict": 40, "temperature": 0})
    [call] = r.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    parts = list(client.chat(model=MODEL, messages=history, tools=[WEATHER], stream=True,
                             options={"num_predict": 40, "temperature": 0}))
    assert [c.function.arguments for p in parts for c in p.message.tool_calls or []] == [{"city": "Paris"}]
