"""Tool calling: which models take tools, vLLM's parsers on canned model output, the JSON a
required call is held to, and both APIs' shapes through the real stack with the fake engine
answering canned text (the real path, vLLM and the bundled model, is in tests/e2e)."""

from __future__ import annotations

import json
from pathlib import Path

import ollama
import openai
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from common.tool_calls import ToolUse, forced_calls, forced_schema, tool_parser_for
from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until
from tests.model_factory import write_model
from workers.fake_engine import FakeEngine, FakeTokenizer
from workers.pull import TEMPLATES
from workers.tool_parsing import ToolCallSplitter

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
BUNDLED_TEMPLATE = (TEMPLATES / "smollm2-tools.jinja").read_text()
# What a Hermes-format model writes when it calls two tools after a few words.
HERMES_REPLY = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
ASK = [{"role": "user", "content": "Weather and time in Paris?"}]


def render(template: str, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The template as Hugging Face tokenizers render it (sandboxed Jinja, tojson)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
    return env.from_string(template).render(messages=messages, tools=tools, add_generation_prompt=True)


# ------------------------------------------------------------ which models take tools


@pytest.mark.parametrize(("template", "parser"), [
    (BUNDLED_TEMPLATE, "hermes"),
    ("{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>", "hermes"),
    ("{% if tools %}<tool_call><function={{ name }}>{% endif %}", "qwen3_coder"),
    ("{% if tools %}Environment: ipython{% endif %}<|python_tag|>", "llama3_json"),
    ("{% if tools %}[AVAILABLE_TOOLS]{{ tools }}{% endif %}[TOOL_CALLS]", "mistral"),
    ("{% for t in tools %}{{ t }}{% endfor %}", None),  # renders tools, no call format known
    ("<tool_call> is mentioned, but tools are never rendered {{ messages }}", None),
    ("", None),
])
def test_the_chat_template_names_the_parser(template, parser):
    assert tool_parser_for(template) == parser


def test_bundled_template_is_the_models_own_without_tools_and_hermes_with_them():
    smollm2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
               "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}")
    for messages in (ASK, [{"role": "system", "content": "Be brief."}, *ASK,
                           {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]):
        assert render(BUNDLED_TEMPLATE, messages) == render(smollm2, messages)

    history = [*ASK,
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                   {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
               {"role": "tool", "tool_call_id": "c2", "content": "14:00"}]
    text = render(BUNDLED_TEMPLATE, history, [WEATHER, TIME])
    assert "<tools>\n" + json.dumps(WEATHER) + "\n" + json.dumps(TIME) + "\n</tools>" in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call><|im_end|>\n'
            in text)
    assert ("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n14:00\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n") in text


# ------------------------------------------------------------ "auto": vLLM's parser on canned output


def split(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_auto_streams_content_and_holds_back_the_calls(size):
    splitter = ToolCallSplitter(ToolUse(tools=[WEATHER, TIME], parser="hermes"), FakeTokenizer())
    streamed = "".join(splitter.feed(piece, [i]) for i, piece in enumerate(split(HERMES_REPLY, size)))
    rest, calls = splitter.finish()
    assert streamed + rest == "Let me check.\n"
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("reply", [
    "No tools needed: it is sunny.",
    'Broken: <tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>',  # not JSON
    '<tool_call>\n{"name": "get_weather", "arguments": "Paris"}\n</tool_call>',  # arguments not an object
])
def test_auto_without_a_readable_call_is_all_content(reply):
    splitter = ToolCallSplitter(ToolUse(tools=[WEATHER], parser="hermes"), FakeTokenizer())
    streamed = "".join(splitter.feed(piece, [i]) for i, piece in enumerate(split(reply, 4)))
    rest, calls = splitter.finish()
    assert calls == [] and streamed + rest == reply


# ------------------------------------------------------------ "required" and a named function


def test_a_required_call_is_held_to_a_schema_and_read_from_json():
    required = ToolUse(tools=[WEATHER, TIME], choice="required")
    schema = forced_schema(required)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    assert [o["properties"]["name"]["enum"] for o in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][0]["properties"]["parameters"] == WEATHER["function"]["parameters"]
    assert forced_schema(required.model_copy(update={"parallel": False}))["maxItems"] == 1
    calls = forced_calls(required, '[{"name": "get_time", "parameters": {"zone": "UTC"}}]')
    assert [(c.name, c.arguments) for c in calls] == [("get_time", {"zone": "UTC"})]
    assert forced_calls(required, '[{"name": "get_time", "param') is None  # cut short by max_tokens

    named = ToolUse(tools=[WEATHER, TIME], choice="function", function="get_time")
    assert forced_schema(named) == TIME["function"]["parameters"]
    [call] = forced_calls(named, '{"zone": "UTC"}')
    assert (call.name, call.arguments) == ("get_time", {"zone": "UTC"})
    no_parameters = {"type": "function", "function": {"name": "ping"}}
    assert forced_schema(ToolUse(tools=[no_parameters], choice="function", function="ping")) == \
        {"type": "object", "properties": {}}


# ------------------------------------------------------------ both APIs, through the stack


def tools_stack(redis_server, tmp_path: Path, reply: str, **settings):
    """The stack serving MODEL with the bundled tools template (so: the hermes parser), its
    fake engine answering ``reply``."""
    write_model(tmp_path, MODEL, chat_template=BUNDLED_TEMPLATE)
    return fake_stack(redis_server.url, pull_worker=True, home=tmp_path, engine=FakeEngine(reply=reply), **settings)


async def test_ollama_chat_returns_calls_with_object_arguments(redis_server, tmp_path):
    async with tools_stack(redis_server, tmp_path, HERMES_REPLY) as stack, stack.client() as http:
        await wait_catalogued(stack)
        r = await http.post("/api/chat", json={"model": MODEL, "stream": False, "messages": ASK,
                                               "tools": [WEATHER, TIME]})
        assert r.status_code == 200 and "x-vllama-tools-dropped" not in r.headers
        message = r.json()["message"]
        assert message["content"] == "Let me check.\n"
        assert [c["function"] for c in message["tool_calls"]] == [
            {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}},
            {"index": 1, "name": "get_time", "arguments": {"zone": "CET"}}]
        assert r.json()["done_reason"] == "stop"
        assert stack.engine.last_chat[1] == [WEATHER, TIME]  # rendered for the model

        r = await http.post("/api/chat", json={"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME]})
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert "".join(line["message"]["content"] for line in lines) == "Let me check.\n"
        [with_calls] = [line for line in lines if line["message"].get("tool_calls")]
        assert with_calls["message"]["content"] == "" and not with_calls["done"]
        assert [c["function"]["name"] for c in with_calls["message"]["tool_calls"]] == ["get_weather", "get_time"]
        assert lines[-1]["done"] and "tool_calls" not in lines[-1]["message"]


async def test_official_ollama_client_round_trip(redis_server, tmp_path):
    async with tools_stack(redis_server, tmp_path, HERMES_REPLY) as stack:
        await wait_catalogued(stack)
        client = ollama.AsyncClient(host=stack.base_url)
        r = await client.chat(model=MODEL, messages=ASK, tools=[WEATHER, TIME])
        calls = r.message.tool_calls
        assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
        history = [*ASK, r.message, {"role": "tool", "tool_name": "get_weather", "content": "sunny"}]
        await client.chat(model=MODEL, messages=history, tools=[WEATHER, TIME])
        rendered, tools = stack.engine.last_chat
        assert tools == [WEATHER, TIME]
        assert rendered[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
        assert rendered[2] == {"role": "tool", "content": "sunny", "name": "get_weather"}


async def test_openai_calls_carry_json_text_arguments_streaming_and_not(redis_server, tmp_path):
    async with tools_stack(redis_server, tmp_path, HERMES_REPLY) as stack:
        await wait_catalogued(stack)
        client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused")
        r = await client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME])
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check.\n"
        calls = choice.message.tool_calls
        assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("function", "get_weather", {"city": "Paris"}), ("function", "get_time", {"zone": "CET"})]

        chunks = [c async for c in await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, TIME], stream=True)]
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == "Let me check.\n"
        streamed = [t for d in deltas for t in d.tool_calls or []]
        assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in streamed] == [
            (0, "get_weather", {"city": "Paris"}), (1, "get_time", {"zone": "CET"})]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

        # The answer to the calls goes back as tool messages.
        history = [*ASK, choice.message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}]
        await client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME])
        rendered, _ = stack.engine.last_chat
        assert rendered[1]["tool_calls"][0] == {"id": calls[0].id, "type": "function",
                                                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        assert rendered[2] == {"role": "tool", "content": "sunny", "tool_call_id": calls[0].id}
        await client.close()


@pytest.mark.parametrize(("choice", "reply", "expected", "schema"), [
    ("required", '[{"name": "get_time", "parameters": {"zone": "UTC"}}]', [("get_time", {"zone": "UTC"})],
     forced_schema(ToolUse(tools=[WEATHER, TIME], choice="required"))),
    ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Oslo"}', [("get_weather", {"city": "Oslo"})],
     WEATHER["function"]["parameters"]),
])
async def test_required_and_named_calls_on_a_model_without_a_parser(redis_server, choice, reply, expected, schema):
    async with fake_stack(redis_server.url, engine=FakeEngine(reply=reply)) as stack:
        client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused")
        r = await client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        assert [(c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls] == expected
        assert stack.engine.last_sampling.json_schema == schema  # what vLLM's structured outputs enforce
        await client.close()


async def test_tools_for_a_model_that_cannot_take_them(redis_server):
    """No parser for the model (here: not in any store's catalog): served without the tools
    and said so in a header; the strict setting gives Ollama's 400 instead."""
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/api/chat", json={"model": MODEL, "stream": False, "tools": [WEATHER], "messages": ASK})
        assert r.status_code == 200 and r.json()["message"]["content"].startswith("tok0")
        assert r.headers["x-vllama-tools-dropped"] == "1" and stack.engine.last_chat[1] is None
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "stream": True, "tools": [WEATHER],
                                                          "messages": ASK})
        assert r.status_code == 200 and r.headers["x-vllama-tools-dropped"] == "1"
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "tools": [WEATHER], "tool_choice": "none",
                                                          "messages": ASK})
        assert "x-vllama-tools-dropped" not in r.headers
    async with fake_stack(redis_server.url, strict_tools=True) as stack, stack.client() as http:
        r = await http.post("/api/chat", json={"model": MODEL, "tools": [WEATHER], "messages": ASK})
        assert r.status_code == 400 and r.json() == {"error": f'"{MODEL}" does not support tools'}


@pytest.mark.parametrize(("body", "message"), [
    ({"tools": [{"type": "retrieval"}]}, "tools[0] must be"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tools": [WEATHER], "messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "Paris"}}]}]},
     "must be a JSON object"),
])
async def test_bad_tools_are_400_saying_what_is_wrong(redis_server, body, message):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


async def wait_catalogued(stack) -> None:
    async with stack.client() as http:
        async def listed() -> bool:
            return MODEL in {m["name"] for m in (await http.get("/api/tags")).json()["models"]}
        await async_wait_until(listed, 10, f"{MODEL} in the catalog")
