"""Thinking through the real stack and real vLLM, with a model that thinks.

How the test makes the 135M model think (tests/model_factory.py, make_thinking_smollm2): the
bundled smollm2, converted, with a Qwen3-Thinking-style template (the answer opens a think
block; with thinking off, an empty one) and two unused special tokens renamed ``<think>`` and
``</think>``; ``</think>`` shares the newline's embedding, 1% longer, so the model closes its
thought where it would have ended a line of it. A few-shot history (thoughts then short
answers) sets the pattern. The model, pulled from the Hub stand-in like any other, runs on
vLLM; the worker picks vLLM's qwen3 reasoning parser from its template."""

from __future__ import annotations

import json

import ollama
import pytest
from openai import OpenAI

from tests.e2e.conftest import MODEL as PLAIN_MODEL, pull_variant
from tests.model_factory import make_thinking_smollm2

pytestmark = pytest.mark.e2e

REPO = "tiny-org/smollm2-think"
SHOTS = [("What is 2+3?", "2 plus 3 makes 5.", "5"),
         ("What is the capital of France?", "France's capital city is Paris.", "Paris"),
         ("What color is the sky?", "On a clear day the sky looks blue.", "Blue")]
QUESTION = "What is 4+4?"
OPTIONS = {"temperature": 0, "num_predict": 40}


def history(thinking_field: str) -> list[dict]:
    """The few-shot conversation, each earlier thought in the API's own field."""
    messages: list[dict] = []
    for question, thought, answer in SHOTS:
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer, thinking_field: thought}]
    return [*messages, {"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def thinking_model(stack, tmp_path_factory) -> str:
    """The thinking model, on the Hub stand-in and pulled into the stack's store."""
    return pull_variant(stack, REPO, make_thinking_smollm2, tmp_path_factory.mktemp("think"))


def test_the_model_thinks_then_answers_in_both_apis(http, thinking_model):
    show = http.post("/api/show", json={"model": thinking_model}).json()
    assert "thinking" in show["capabilities"]

    r = http.post("/api/chat", json={"model": thinking_model, "messages": history("thinking"), "options": OPTIONS},
                  timeout=300)
    assert r.status_code == 200, r.text
    lines = [json.loads(line) for line in r.text.splitlines()]
    thoughts = [x["message"]["thinking"] for x in lines if "thinking" in x["message"]]
    answer = "".join(x["message"]["content"] for x in lines)
    thinking = "".join(thoughts)
    # It thought, then answered; the markers are in neither, and no thought came after the answer.
    assert thinking.strip() and answer.strip(), (thinking, answer)
    assert not any(marker in thinking + answer for marker in ("<think>", "</think>"))
    first_answer = next(i for i, x in enumerate(lines) if x["message"]["content"])
    assert all("thinking" not in x["message"] for x in lines[first_answer:])
    assert lines[-1]["eval_count"] >= len(thoughts)  # the thought's tokens count as generated

    # The same request through OpenAI's API (greedy, same prompt): the same split.
    client = OpenAI(base_url=f"{http.base_url}/v1", api_key="unused")
    completion = client.chat.completions.create(model=thinking_model, messages=history("reasoning_content"),
                                                temperature=0, max_tokens=40)
    message = completion.choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == (thinking, answer)


def test_think_false_asks_the_template_not_to_think(http, thinking_model):
    r = ollama.Client(host=str(http.base_url), timeout=300).chat(
        model=thinking_model, messages=history("thinking"), think=False, options=OPTIONS)
    assert not r.message.thinking and r.message.content.strip()


def test_a_model_that_does_not_think_refuses_think(http):
    r = http.post("/api/chat", json={"model": PLAIN_MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "think": True})
    assert (r.status_code, r.json()["error"]) == (400, f'"{PLAIN_MODEL}" does not support thinking')
    r = http.post("/api/chat", json={"model": PLAIN_MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "think": False, "stream": False, "options": {"num_predict": 4}})
    assert r.status_code == 200 and "thinking" not in r.json()["message"]


def test_a_json_schema_holds_for_the_answer_not_the_thought(http, thinking_model):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    r = http.post("/api/chat", json={"model": thinking_model, "messages": history("thinking"), "format": schema,
                                     "stream": False, "options": {**OPTIONS, "num_predict": 80}}, timeout=300)
    assert r.status_code == 200, r.text
    message = r.json()["message"]
    assert message["thinking"].strip(), "the thought is free text: the schema does not hold there"
    assert isinstance(json.loads(message["content"])["answer"], int), message
