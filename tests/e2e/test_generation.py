"""Generate and chat through the whole stack with real vLLM, streaming and not."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import MODEL
from tests.harness import ndjson_lines

pytestmark = pytest.mark.e2e
STATS = {"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration"}


def test_generate_streaming_and_not_give_the_same_greedy_answer(http):
    body = {"model": MODEL, "prompt": "Name three colors.", "options": {"temperature": 0, "num_predict": 24}}
    r = http.post("/api/generate", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    chunks = ndjson_lines(r.text)
    assert len(chunks) > 2
    for c in chunks[:-1]:
        assert set(c) == {"model", "created_at", "response", "done"} and c["done"] is False
    final = chunks[-1]
    assert final["done"] is True and final["done_reason"] in ("stop", "length")
    assert STATS <= final.keys() and final["eval_count"] <= 24 and final["prompt_eval_count"] > 5
    assert all(isinstance(final[k], int) for k in STATS)
    assert isinstance(final["context"], list) and len(final["context"]) == final["prompt_eval_count"] + final["eval_count"]
    streamed = "".join(c["response"] for c in chunks)
    assert streamed.strip()

    one = http.post("/api/generate", json={**body, "stream": False})
    assert one.status_code == 200 and one.headers["content-type"].startswith("application/json")
    assert one.json()["response"] == streamed
    assert one.json()["eval_count"] == final["eval_count"]


def test_num_predict_stops_with_length(http):
    r = http.post("/api/generate", json={"model": MODEL, "prompt": "Tell me a long story.", "stream": False,
                                         "options": {"num_predict": 5}})
    body = r.json()
    assert body["done_reason"] == "length" and body["eval_count"] == 5


def test_system_and_raw_change_what_the_model_sees(http):
    base = {"model": MODEL, "prompt": "Hello", "stream": False, "options": {"num_predict": 1}}
    plain = http.post("/api/generate", json=base).json()
    with_system = http.post("/api/generate", json={**base, "system": "You are a pirate who answers in rhymes."}).json()
    raw = http.post("/api/generate", json={**base, "raw": True}).json()
    # The chat template wraps the prompt; a system message adds its tokens; raw adds nothing.
    assert raw["prompt_eval_count"] <= 2 < plain["prompt_eval_count"]
    assert with_system["prompt_eval_count"] != plain["prompt_eval_count"]
    assert "context" not in raw


def test_chat_multi_turn_streaming_and_not(http):
    messages = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    opts = {"temperature": 0, "num_predict": 20}
    r = http.post("/api/chat", json={"model": MODEL, "messages": messages, "options": opts})
    chunks = ndjson_lines(r.text)
    assert all(c["message"]["role"] == "assistant" for c in chunks)
    final = chunks[-1]
    assert final["done"] is True and final["message"]["content"] == "" and STATS <= final.keys()
    streamed = "".join(c["message"]["content"] for c in chunks)
    assert streamed.strip()
    one = http.post("/api/chat", json={"model": MODEL, "messages": messages, "options": opts, "stream": False}).json()
    assert one["message"]["content"] == streamed
    first_turn = http.post("/api/chat", json={"model": MODEL, "messages": messages[:2], "options": opts,
                                               "stream": False}).json()
    assert one["prompt_eval_count"] > first_turn["prompt_eval_count"]


def test_stop_sequence_and_seed(http):
    body = {"model": MODEL, "prompt": "Count: one, two, three, four, five, six", "stream": False,
            "options": {"temperature": 0, "num_predict": 40, "stop": [","]}}
    r = http.post("/api/generate", json=body).json()
    assert "," not in r["response"]
    seeded = {"model": MODEL, "prompt": "Write a word.", "stream": False,
              "options": {"temperature": 1.0, "seed": 42, "num_predict": 12}}
    a = http.post("/api/generate", json=seeded).json()["response"]
    b = http.post("/api/generate", json=seeded).json()["response"]
    assert a == b


def test_format_json_is_constrained(http):
    r = http.post("/api/generate", json={"model": MODEL, "prompt": "Describe a cat as JSON.", "format": "json",
                                         "stream": False, "options": {"temperature": 0, "num_predict": 60}}).json()
    assert r["response"].lstrip().startswith("{")
    if r["done_reason"] == "stop":
        assert isinstance(json.loads(r["response"]), dict)


def test_format_json_schema_output_parses_and_matches(http):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "count": {"type": "integer"}},
              "required": ["answer", "count"], "additionalProperties": False}
    r = http.post("/api/chat", json={"model": MODEL, "format": schema, "stream": False,
                                     "messages": [{"role": "user", "content": "Is the sky blue? How many suns?"}],
                                     "options": {"temperature": 0, "num_predict": 60}}).json()
    value = json.loads(r["message"]["content"])
    assert value["answer"] in ("yes", "no") and isinstance(value["count"], int)
    assert set(value) == {"answer", "count"}


def test_concurrent_requests_all_complete_in_one_batch(http, stack):
    import concurrent.futures

    def one(i: int) -> dict:
        return http.post("/api/generate", json={"model": MODEL, "prompt": f"Say the number {i}.", "stream": False,
                                                "options": {"num_predict": 16}}).json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(r["done"] and r["eval_count"] > 0 for r in results)


def test_prompt_longer_than_the_context_is_cut_to_fit_or_400_without_truncate(http):
    body = {"model": MODEL, "prompt": "word " * 300, "stream": False, "options": {"num_ctx": 128, "num_predict": 4}}
    r = http.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["prompt_eval_count"] < 128 and r.json()["eval_count"] > 0
    r = http.post("/api/generate", json={**body, "truncate": False})
    assert r.status_code == 400
    assert "context length is 128" in r.json()["error"]


def test_an_answer_longer_than_the_window_shifts_and_goes_on(http):
    # Counting on, greedily: the model has no reason to stop within 100 tokens.
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "raw": True, "stream": False,
            "options": {"num_ctx": 64, "num_predict": 100, "temperature": 0}}
    r = http.post("/api/generate", json=body).json()
    assert (r["eval_count"], r["done_reason"]) == (100, "length"), r
    r = http.post("/api/generate", json={**body, "shift": False}).json()
    assert (r["eval_count"], r["done_reason"]) == (64 - r["prompt_eval_count"], "length"), r


def test_unknown_model_is_404(http):
    r = http.post("/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"})
    assert r.status_code == 404
    assert r.json()["error"].startswith("model 'llama3.1:8b' not found, try pulling it first")


def test_a_schema_the_engine_cannot_use_is_400_and_the_worker_serves_on(http):
    r = http.post("/api/generate", json={"model": MODEL, "prompt": "x", "format": {"type": "objekt"}})
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("the request cannot be run")
    ok = http.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 3}})
    assert ok.status_code == 200 and ok.json()["eval_count"] == 3


# SmolLM2's own ChatML, as an Ollama (Go) template: the same text its chat template renders.
SMOLLM2_GO_TEMPLATE = (
    "<|im_start|>system\n{{ if .System }}{{ .System }}{{ else }}You are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face{{ end }}<|im_end|>\n{{ range .Messages }}{{ if ne .Role \"system\" }}"
    "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n")


def test_an_ollama_template_renders_the_prompt_the_model_runs(http):
    body = {"model": MODEL, "prompt": "Name a primary color.", "system": "Answer in one word.", "stream": False,
            "options": {"temperature": 0, "num_predict": 8}}
    own = http.post("/api/generate", json=body).json()
    templated = http.post("/api/generate", json={**body, "template": SMOLLM2_GO_TEMPLATE}).json()
    assert (templated["prompt_eval_count"], templated["response"]) == (own["prompt_eval_count"], own["response"])
    assert templated["context"] == own["context"]
    # Another template, another prompt: the model sees what the template wrote.
    plain = http.post("/api/generate", json={**body, "template": "{{ .Prompt }}"}).json()
    assert plain["prompt_eval_count"] < own["prompt_eval_count"]
