"""Prompts longer than the context window, as Ollama treats them: truncate, shift, num_keep.

The fake engine makes one token of each character of the rendered prompt
(``<role>content`` per message, then ``<assistant>``), so the tests can say exactly which
tokens a cut keeps.
"""

from __future__ import annotations

import pytest

from tests.fake_stack import MODEL, fake_stack
from workers.context_window import cut, fitting_messages, keep_count
from workers.fake_engine import VOCAB_SIZE, FakeEngine




def tokens(text: str) -> list[int]:
    return [ord(c) % VOCAB_SIZE for c in text]


# ---------------------------------------------------------------- the rules


def test_a_cut_keeps_the_head_and_the_most_recent_tokens_leaving_half_the_room_free():
    ids = list(range(100))
    out = cut(ids, keep=4, window=20)
    # 16 tokens of room after the 4 kept: half of them are freed, the 8 latest stay.
    assert out == [0, 1, 2, 3, *range(92, 100)]
    assert len(cut(ids, keep=0, window=20)) == 10
    assert cut(ids, keep=0, window=20) == list(range(90, 100))


def test_keep_count_defaults_to_ollamas_4_and_never_fills_the_window():
    assert keep_count(None, 50, 100) == 4
    assert keep_count(10, 50, 100) == 10
    assert keep_count(-1, 50, 100) == 50  # -1: the whole prompt
    assert keep_count(-1, 500, 100) == 98  # two short of the window, so a cut frees room
    assert keep_count(1000, 50, 100) == 98
    assert len(cut(list(range(500)), keep_count(-1, 500, 100), 100)) < 100


def test_the_oldest_messages_go_first_and_system_messages_stay():
    messages = ["s:sys", "u:one", "a:two", "s:late system", "u:three", "a:four", "u:five"]

    def fits_under(limit: int):
        return lambda kept: sum(map(len, kept)) < limit

    def is_system(m: str) -> bool:
        return m.startswith("s:")

    # Room for the system messages and the last three.
    kept = fitting_messages(messages, is_system, fits_under(len("s:sys" "s:late system" "u:three" "a:four" "u:five") + 1))
    assert kept == ["s:sys", "s:late system", "u:three", "a:four", "u:five"]
    # Room for nothing: the latest message stays all the same, with the system messages.
    assert fitting_messages(messages, is_system, fits_under(1)) == ["s:sys", "s:late system", "u:five"]
    assert fitting_messages(["u:only"], is_system, fits_under(1)) == ["u:only"]


# ---------------------------------------------------------------- through the stack


async def test_an_over_long_generate_prompt_is_cut_keeping_num_keep_tokens(redis_server):
    engine = FakeEngine(max_model_len=64, answer_tokens=3)
    prompt = "HEADER" + "x" * 200 + "TAIL"
    async with fake_stack(redis_server.url, engine=engine) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": prompt, "stream": False})
        assert r.status_code == 200, r.text
        body = r.json()
        rendered = tokens(f"<user>{prompt}<assistant>")
        assert body["context"][:-3] == cut(rendered, 4, 64)
        assert body["prompt_eval_count"] == len(cut(rendered, 4, 64)) < 64
        assert body["context"][:4] == tokens("<use")  # num_keep 4: the start of the prompt

        r = await http.post("/api/generate", json={"model": MODEL, "prompt": prompt, "stream": False,
                                                   "options": {"num_keep": 10}})
        assert r.json()["context"][:10] == tokens("<user>HEAD")
        assert r.json()["context"][-3 - len("TAIL<assistant>"):-3] == tokens("TAIL<assistant>")


async def test_truncate_false_is_ollamas_400(redis_server):
    async with fake_stack(redis_server.url, engine=FakeEngine(max_model_len=64)) as stack, stack.client() as http:
        for path, body in (("/api/generate", {"prompt": "x" * 100}),
                           ("/api/chat", {"messages": [{"role": "user", "content": "x" * 100}]})):
            r = await http.post(path, json={"model": MODEL, "truncate": False, "stream": False, **body})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert "the input length exceeds the context length" in error and "context length is 64" in error


async def test_a_long_chat_loses_its_oldest_turns_and_keeps_the_system_prompt(redis_server):
    engine = FakeEngine(max_model_len=128, answer_tokens=2)
    messages = [{"role": "system", "content": "BE BRIEF"},
                {"role": "user", "content": "old question " + "o" * 60},
                {"role": "assistant", "content": "old answer " + "a" * 60},
                {"role": "user", "content": "recent question"},
                {"role": "assistant", "content": "recent answer"},
                {"role": "user", "content": "now?"}]
    async with fake_stack(redis_server.url, engine=engine) as stack, stack.client() as http:
        r = await http.post("/api/chat", json={"model": MODEL, "messages": messages, "stream": False})
        assert r.status_code == 200, r.text
        sent, _ = engine.last_chat
        assert [m["content"] for m in sent] == ["BE BRIEF", "recent question", "recent answer", "now?"]
        assert r.json()["prompt_eval_count"] < 128


async def test_a_single_message_too_long_for_the_window_is_cut_by_tokens(redis_server):
    engine = FakeEngine(max_model_len=64, answer_tokens=2)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "q" * 300 + "END"}]
    async with fake_stack(redis_server.url, engine=engine) as stack, stack.client() as http:
        r = await http.post("/api/chat", json={"model": MODEL, "messages": messages, "stream": False})
        assert r.status_code == 200, r.text
        assert r.json()["prompt_eval_count"] == len(cut(tokens("<system>S<user>" + "q" * 300 + "END<assistant>"),
                                                        4, 64))


async def test_an_answer_that_fills_the_window_shifts_and_goes_on_to_num_predict(redis_server):
    engine = FakeEngine(max_model_len=64, answer_tokens=500)
    async with fake_stack(redis_server.url, engine=engine) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False,
                                                   "options": {"num_predict": 150}})
        body = r.json()
        assert body["eval_count"] == 150 and body["done_reason"] == "length"
        shifts = [s for s in engine.started if "-shift" in s]
        assert len(shifts) >= 2  # 64 tokens of window cannot hold 150 without cutting
        assert len(body["context"]) == len(tokens("<user>hi<assistant>")) + 150

        # shift false: the answer ends where the window does.
        engine.started.clear()
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False, "shift": False,
                                                   "options": {"num_predict": 150}})
        room = 64 - len(tokens("<user>hi<assistant>"))
        assert r.json()["eval_count"] == room and r.json()["done_reason"] == "length"
        assert not [s for s in engine.started if "-shift" in s]

        # No num_predict: the window bounds the answer, as before.
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False})
        assert r.json()["eval_count"] == room


async def test_structured_output_does_not_shift(redis_server):
    engine = FakeEngine(max_model_len=64, answer_tokens=500)
    async with fake_stack(redis_server.url, engine=engine) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False, "format": "json",
                                                   "options": {"num_predict": 150}})
        assert r.json()["eval_count"] == 64 - len(tokens("<user>hi<assistant>"))
        assert not [s for s in engine.started if "-shift" in s]


async def test_openai_apis_answer_400_and_responses_truncation_auto_cuts(redis_server):
    engine = FakeEngine(max_model_len=64, answer_tokens=2)
    long = "y" * 100
    async with fake_stack(redis_server.url, engine=engine) as stack, stack.client() as http:
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": long}]})
        assert r.status_code == 400 and "context length is 64" in r.json()["error"]["message"]
        r = await http.post("/v1/responses", json={"model": MODEL, "input": long})
        assert r.status_code == 400
        r = await http.post("/v1/responses", json={"model": MODEL, "input": long, "truncation": "auto"})
        assert r.status_code == 200, r.text
        assert r.json()["truncation"] == "auto"


async def test_options_num_keep_is_checked(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "x", "options": {"num_keep": -2}})
        assert r.status_code == 400 and "options.num_keep" in r.json()["error"]
