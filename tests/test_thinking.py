"""Thinking: which templates think, vLLM's reasoning parsers on canned streams split at every
position, and both APIs' shapes through the real stack with the fake engine answering canned
reasoning (the real path, vLLM and a model that thinks, is in tests/e2e/test_thinking.py)."""

from __future__ import annotations

import json

import ollama
import openai
import pytest

from common.thinking import ollama_think, openai_effort, reasoning_parser_for, template_kwargs
from tests.fake_stack import MODEL, fake_stack
from tests.model_factory import thinking_template, write_model
from tests.test_batches import chat_line, client_for, finished, start_batch
from tests.test_jobs import wait_status
from tests.test_tool_calls import ASK, BUNDLED_TEMPLATE, WEATHER, wait_catalogued
from workers.fake_engine import FakeEngine, FakeTokenizer
from workers.reasoning import ThinkingSplitter

# The bundled model's template made to think as Qwen3's does (the qwen3 parser).
THINKING_TEMPLATE = thinking_template(BUNDLED_TEMPLATE)
THOUGHT, ANSWER = "The user asks about 2+2. That is 4.", "2 + 2 = 4."
REPLY = f"<think>{THOUGHT}</think>{ANSWER}"


# ------------------------------------------------------------ which templates think


@pytest.mark.parametrize(("template", "parser"), [
    (THINKING_TEMPLATE, "qwen3"),
    ("{% if enable_thinking %}<think>{% endif %}", "qwen3"),
    ("{{ '<｜Assistant｜><think>\\n' }}", "deepseek_r1"),
    ("<|start|>assistant<|channel|>analysis{{ reasoning_effort }}", "openai_gptoss"),
    ("[THINK]{{ thinking }}[/THINK]", "mistral"),
    (BUNDLED_TEMPLATE, None),
    ("", None),
])
def test_the_chat_template_names_the_reasoning_parser(template, parser):
    assert reasoning_parser_for(template) == parser


def test_what_templates_are_told():
    assert template_kwargs(None, levels=False) == {}  # the template's own default
    assert template_kwargs(False, levels=True) == {"enable_thinking": False, "thinking": False}
    assert template_kwargs("high", levels=False) == {"enable_thinking": True, "thinking": True}
    assert template_kwargs(True, levels=True)["reasoning_effort"] == "medium"  # Ollama's meaning of true
    assert template_kwargs("max", levels=True)["reasoning_effort"] == "high"
    assert [openai_effort(e) for e in ("none", "minimal", "low", "xhigh", None)] == [False, "low", "low", "max", None]
    with pytest.raises(ValueError, match="reasoning_effort"):
        openai_effort("extreme")
    with pytest.raises(ValueError, match="think"):
        ollama_think("maybe")


# ------------------------------------------------------------ the parser, split everywhere


def split_everywhere(parser: str, think, text: str) -> set[tuple[str, str, str]]:
    """(reasoning, content, the text of the content's token ids) of ``text`` streamed in two
    pieces, cut at every token, and one token per piece."""
    tokenizer = FakeTokenizer()
    tokens = tokenizer.tokens(text)
    cuts = [[tokens[:i], tokens[i:]] for i in range(len(tokens) + 1)] + [[[t] for t in tokens]]
    seen = set()
    for pieces in cuts:
        splitter = ThinkingSplitter(parser, think, False, tokenizer, prompt_ids=[7, 8])
        reasoning = content = ""
        ids: list[int] = []
        for piece in filter(None, pieces):
            r, c, c_ids = splitter.feed("".join(p for p, _ in piece), [i for _, i in piece])
            reasoning, content, ids = reasoning + r, content + c, ids + c_ids
        seen.add((reasoning, content, tokenizer.decode(ids)))
    return seen


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
@pytest.mark.parametrize("text", [REPLY, f"{THOUGHT}</think>{ANSWER}"])  # the template may open the block
def test_reasoning_and_answer_come_apart_wherever_the_stream_is_cut(parser, text):
    assert split_everywhere(parser, True, text) == {(THOUGHT, ANSWER, ANSWER)}


def test_an_answer_without_thinking_is_all_content_when_thinking_is_off():
    assert split_everywhere("qwen3", False, ANSWER) == {("", ANSWER, ANSWER)}


def test_a_model_that_never_closes_its_thought_gives_only_thinking():
    assert {(r, c) for r, c, _ in split_everywhere("qwen3", None, "<think>still thinking")} == {("still thinking", "")}


# ------------------------------------------------------------ both APIs, through the stack


def thinking_stack(redis_server, tmp_path, reply: str = REPLY, template: str = THINKING_TEMPLATE, **settings):
    """The stack serving MODEL, whose template thinks (and renders tools, Hermes-style)."""
    write_model(tmp_path, MODEL, chat_template=template)
    return fake_stack(redis_server.url, pull_worker=True, home=tmp_path,
                      engine=FakeEngine(reply=reply, chat_template=template), **settings)


async def test_ollama_chat_and_generate_keep_the_thinking_apart(redis_server, tmp_path):
    async with thinking_stack(redis_server, tmp_path) as stack, stack.client() as http:
        await wait_catalogued(stack)
        show = (await http.post("/api/show", json={"model": MODEL})).json()
        assert "thinking" in show["capabilities"]

        lines = [json.loads(x) for x in (await http.post("/api/chat", json={"model": MODEL, "messages": ASK})).text
                 .splitlines()]
        thinking = [x["message"]["thinking"] for x in lines if "thinking" in x["message"]]
        content = [x["message"]["content"] for x in lines]
        assert "".join(thinking) == THOUGHT and "".join(content) == ANSWER
        # Reasoning in chunks of its own, all before the answer.
        first_answer = next(i for i, x in enumerate(lines) if x["message"]["content"])
        assert all("thinking" not in x["message"] for x in lines[first_answer:])
        assert all(x["message"]["content"] == "" for x in lines if "thinking" in x["message"])
        assert stack.engine.last_template_kwargs == {}  # think unset: the template's default (thinking)

        whole = (await http.post("/api/generate", json={"model": MODEL, "prompt": "2+2?", "stream": False,
                                                        "think": True})).json()
        assert (whole["thinking"], whole["response"]) == (THOUGHT, ANSWER)
        assert stack.engine.last_template_kwargs == {"enable_thinking": True, "thinking": True}
        r = await http.post("/api/chat", json={"model": MODEL, "messages": ASK, "think": False, "stream": False})
        assert r.status_code == 200 and stack.engine.last_template_kwargs["enable_thinking"] is False


async def test_official_clients_read_the_thinking(redis_server, tmp_path):
    async with thinking_stack(redis_server, tmp_path) as stack:
        await wait_catalogued(stack)
        r = await ollama.AsyncClient(host=stack.base_url).chat(model=MODEL, messages=ASK, think=True)
        assert (r.message.thinking, r.message.content) == (THOUGHT, ANSWER)
        # The reasoning goes back in the history, where the template renders it.
        history = [*ASK, r.message, {"role": "user", "content": "And 3+3?"}]
        await ollama.AsyncClient(host=stack.base_url).chat(model=MODEL, messages=history, think=True)
        assert stack.engine.last_chat[0][1]["reasoning_content"] == THOUGHT

        client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused")
        r = await client.chat.completions.create(model=MODEL, messages=ASK)
        message = r.choices[0].message
        assert (message.model_extra["reasoning_content"], message.content) == (THOUGHT, ANSWER)
        chunks = [c async for c in await client.chat.completions.create(
            model=MODEL, messages=ASK, stream=True, reasoning_effort="low")]
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == THOUGHT
        assert "".join(d.content or "" for d in deltas) == ANSWER
        await client.chat.completions.create(model=MODEL, messages=ASK, reasoning_effort="none")
        assert stack.engine.last_template_kwargs["enable_thinking"] is False
        with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
            await client.chat.completions.create(model=MODEL, messages=ASK, reasoning_effort="extreme")
        await client.close()


async def test_thinking_and_tool_calls_in_one_answer(redis_server, tmp_path):
    reply = ('<think>The user wants the weather; I should call the tool.</think>'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    async with thinking_stack(redis_server, tmp_path, reply=reply) as stack, stack.client() as http:
        await wait_catalogued(stack)
        r = await http.post("/api/chat", json={"model": MODEL, "messages": ASK, "tools": [WEATHER], "stream": False})
        message = r.json()["message"]
        assert message["thinking"] == "The user wants the weather; I should call the tool."
        assert message["content"] == ""
        assert [c["function"]["arguments"] for c in message["tool_calls"]] == [{"city": "Paris"}]


async def test_a_model_that_does_not_think_refuses_think_but_takes_think_false(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:  # the counting engine: no template
        for body in ({"think": True}, {"think": "high"}):
            r = await http.post("/api/chat", json={"model": MODEL, "messages": ASK, **body})
            assert (r.status_code, r.json()["error"]) == (400, f'"{MODEL}" does not support thinking')
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "reasoning_effort": "high"})
        assert r.status_code == 400 and "does not support thinking" in r.json()["error"]["message"]
        r = await http.post("/api/chat", json={"model": MODEL, "messages": ASK, "think": False, "stream": False})
        assert r.status_code == 200 and "thinking" not in r.json()["message"]
        r = await http.post("/api/chat", json={"model": MODEL, "messages": ASK, "think": "deep"})
        assert r.status_code == 400 and "think" in r.json()["error"]


async def test_async_jobs_keep_the_thinking(redis_server, tmp_path):
    async with thinking_stack(redis_server, tmp_path) as stack, stack.client() as http:
        await wait_catalogued(stack)
        r = await http.post("/api/jobs/chat", json={"model": MODEL, "messages": ASK})
        assert r.status_code == 202
        body = await wait_status(http, r.json()["id"], "done")
        assert body["thinking"] == THOUGHT and body["output"] == ANSWER
        assert (body["result"]["message"]["thinking"], body["result"]["message"]["content"]) == (THOUGHT, ANSWER)


async def test_batch_lines_keep_the_thinking(redis_server, tmp_path):
    async with thinking_stack(redis_server, tmp_path) as stack:
        await wait_catalogued(stack)
        client = client_for(stack)
        batch = await start_batch(client, [chat_line(0, max_tokens=None), chat_line(1, reasoning_effort="none")])
        assert (await finished(client, batch.id))[-1].status == "completed"
        output = (await client.files.content((await client.batches.retrieve(batch.id)).output_file_id)).content
        lines = {x["custom_id"]: x["response"]["body"]["choices"][0]["message"]
                 for x in map(json.loads, output.splitlines())}
        assert (lines["req-0"]["reasoning_content"], lines["req-0"]["content"]) == (THOUGHT, ANSWER)
        await client.close()
