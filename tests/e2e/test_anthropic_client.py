"""The official `anthropic` package against the real stack and real vLLM: text, the SDK's
stream helpers, a stop sequence, a tool round trip and count_tokens."""

from __future__ import annotations

import anthropic
import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Say hello."}]
GREEDY = {"temperature": 0}  # the current SDK has no temperature argument; older ones and curl send it
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture
def client(stack):
    return anthropic.Anthropic(base_url=stack.base_url, api_key="unused", max_retries=0)


def test_message_and_stream(client):
    m = client.messages.create(model=MODEL, max_tokens=16, messages=HELLO, extra_body=GREEDY)
    assert m.role == "assistant" and m.content[0].type == "text" and m.content[0].text.strip()
    assert m.stop_reason in ("end_turn", "max_tokens") and 0 < m.usage.output_tokens <= 16
    assert m.usage.input_tokens > 5

    with client.messages.stream(model=MODEL, max_tokens=16, messages=HELLO, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == m.content[0].text == final.content[0].text  # greedy: the same answer streamed
    assert (final.usage.input_tokens, final.usage.output_tokens) == (m.usage.input_tokens, m.usage.output_tokens)


def test_stop_sequence_is_named(client):
    """The answer ends at the stop string and says which one (vLLM reports it)."""
    m = client.messages.create(model=MODEL, max_tokens=64, extra_body=GREEDY,
                               messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    text = m.content[0].text
    stop = next((d for d in ("3", "4", "5") if d in text), None)
    assert stop is not None, text
    cut = client.messages.create(model=MODEL, max_tokens=64, stop_sequences=[stop], extra_body=GREEDY,
                                 messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert cut.content[0].text == text[:text.index(stop)]


def test_tool_round_trip_and_count_tokens(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    called = client.messages.create(model=MODEL, max_tokens=64, messages=ask, tools=[WEATHER],
                                    tool_choice={"type": "tool", "name": "get_weather"})
    assert called.stop_reason == "tool_use"
    [use] = [b for b in called.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input.get("city"), str)

    history = [*ask, {"role": "assistant", "content": [b.model_dump() for b in called.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                             "content": "sunny, 21 C"}]}]
    answer = client.messages.create(model=MODEL, max_tokens=32, messages=history, tools=[WEATHER],
                                    extra_body=GREEDY)
    assert answer.content and answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # count_tokens renders the same prompt the answer was given, without generating.
    count = client.messages.count_tokens(model=MODEL, messages=history, tools=[WEATHER])
    assert count.input_tokens == answer.usage.input_tokens
    assert count.input_tokens > client.messages.count_tokens(model=MODEL, messages=history).input_tokens
