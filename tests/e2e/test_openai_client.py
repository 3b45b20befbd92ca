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
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    assert MODEL in [m.id for m in client.models.list().data]
