"""Ollama templates (Go templates) in place of the model's chat template: /api/generate's
``template``, and ``template`` in /api/create, filled in as Ollama fills them
(common/ollama_templates.py). The fake engine makes one token of each character of a raw
prompt, so the tests read back the exact text the template rendered. Through real vLLM:
tests/e2e/test_generation.py."""

from __future__ import annotations

import ollama
import pytest

from common.ollama_templates import collate, compile_template, render
from common.protocol import ChatMessage
from tests.fake_stack import MODEL, fake_stack
from tests.model_factory import write_model
from tests.test_tool_calls import wait_catalogued
from tests.test_images import b64, png
from workers.fake_engine import FakeEngine

LLAMA2 = "{{ if .System }}<<SYS>>{{ .System }}<</SYS>>{{ end }}[INST] {{ .Prompt }} [/INST]"
CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
          "<|im_start|>assistant\n")
INFILL = "{{ if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>{{ else }}{{ .Prompt }}{{ end }}"


def text_of(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)  # the texts here have no character past the fake vocabulary


def messages(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in pairs]


def test_a_template_without_messages_renders_a_turn_at_a_time_and_stops_at_the_last_response():
    template = compile_template(LLAMA2 + "{{ .Response }}</s>")
    chat = messages(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"))
    assert render(template, chat) == ("<<SYS>>Be brief.<</SYS>>[INST] Hi [/INST]Hello!</s>"
                                      "[INST] Bye [/INST]")
    # A last assistant message is a prefill: the answer goes on from it.
    assert render(template, chat[:3]) == "<<SYS>>Be brief.<</SYS>>[INST] Hi [/INST]Hello!"
    # Without .Response, Ollama appends it.
    assert "response" in compile_template(LLAMA2).identifiers


def test_a_template_with_messages_gets_them_collated():
    chat = messages(("system", "A"), ("system", "B"), ("user", "one"), ("user", "two"), ("assistant", "x"))
    system, merged = collate(chat)
    assert system == "A\n\nB"
    assert [(m.role, m.content) for m in merged] == [("system", "A\n\nB"), ("user", "one\n\ntwo"), ("assistant", "x")]
    rendered = render(compile_template("{{ .System }}|{{ range .Messages }}{{ .Role }}:{{ .Content }};{{ end }}"), chat)
    assert rendered == "A\n\nB|system:A\n\nB;user:one\n\ntwo;assistant:x;"


def fake_engine() -> FakeEngine:
    return FakeEngine(answer_tokens=2)


async def test_generate_with_a_template_sends_exactly_what_it_renders(redis_server):
    engine = fake_engine()
    async with fake_stack(redis_server.url, engine=engine) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "system": "Be brief.",
                                                   "template": LLAMA2, "stream": False})
        assert r.status_code == 200, r.text
        assert text_of(engine.last_prompt) == "<<SYS>>Be brief.<</SYS>>[INST] Hi [/INST]"

        r = await http.post("/api/chat", json={"model": MODEL, "stream": False, "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "Bye"}]})
        assert text_of(engine.last_prompt) == "<user>Hi<assistant>Yo<user>Bye<assistant>"  # the model's own

        # A template that reads .Suffix fills in the middle, on any model.
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "def f(", "suffix": "return 1",
                                                   "template": INFILL, "stream": False})
        assert r.status_code == 200, r.text
        assert text_of(engine.last_prompt) == "<PRE> def f( <SUF>return 1 <MID>"
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "x", "suffix": "y", "template": LLAMA2})
        assert r.status_code == 400 and "does not support insert" in r.json()["error"]


@pytest.mark.parametrize(("template", "message"), [
    ("{{ .Prompt ", "unclosed action"),
    ("{{ define \"x\" }}{{ end }}", "define"),
    ("{{ toTypeScriptType .Tools }}", "toTypeScriptType"),
])
async def test_a_template_we_cannot_render_is_400_saying_where(redis_server, template, message):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "template": template})
        assert r.status_code == 400, r.text
        assert message in r.json()["error"] and "template:1:" in r.json()["error"]
        assert "leaving template out" in r.json()["error"]


async def test_a_template_failing_on_its_data_and_one_with_images_are_400(redis_server):
    async with fake_stack(redis_server.url, engine=FakeEngine(vision=True)) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "stream": False,
                                                   "template": "{{ index .Messages 5 }}"})
        assert r.status_code == 400 and "index" in r.json()["error"]
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "stream": False,
                                                   "template": LLAMA2, "images": [b64(png(2, 2))]})
        assert r.status_code == 400 and "cannot place images" in r.json()["error"]


async def test_a_model_created_with_a_template_uses_it_for_every_request(redis_server, tmp_path):
    write_model(tmp_path, MODEL)
    engine = fake_engine()
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path, engine=engine,
                          engine_factory=lambda name, path: engine) as stack, stack.client() as http:
        await wait_catalogued(stack)
        client = ollama.AsyncClient(host=stack.base_url)
        await client.create(model="chatml:1b", from_=MODEL, template=CHATML, system="Be brief.")
        shown = await client.show("chatml:1b")
        assert shown.template == CHATML and 'TEMPLATE "{{- range .Messages }}' in shown.modelfile

        await client.chat(model="chatml:1b", messages=[{"role": "user", "content": "Hi"}])
        assert text_of(engine.last_prompt) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                               "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        await client.generate(model="chatml:1b", prompt="Hi")
        assert text_of(engine.last_prompt).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        # The request's own template wins; raw uses none.
        await client.generate(model="chatml:1b", prompt="Hi", template=LLAMA2)
        assert text_of(engine.last_prompt) == "<<SYS>>Be brief.<</SYS>>[INST] Hi [/INST]"
        await client.generate(model="chatml:1b", prompt="Hi", raw=True)
        assert text_of(engine.last_prompt) == "Hi"

        r = await http.post("/api/create", json={"model": "bad:1b", "from": MODEL, "template": "{{ if }}"})
        assert r.status_code == 400 and "template:1:" in r.json()["error"]

