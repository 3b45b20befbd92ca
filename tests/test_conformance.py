"""Conformance: per API family, requests that send every field the server documents at least
once, and every answer checked against the official client's own types (the pydantic models
of `ollama`, `openai` and `anthropic`): validated strictly (a number sent as a string, a
list where an object belongs, fails), and with no key the type does not know (a misspelt or
drifted field fails too). Real HTTP against the stack with the fake engine, its model a
thinking one whose template renders tools, so reasoning and tool calls are in the answers.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import anthropic.types as at
import ollama._types as ot
import openai.types as oat
import openai.types.chat as oc
import openai.types.responses as orr
import pytest
from pydantic import BaseModel, TypeAdapter

from tests.fake_stack import MODEL, fake_stack
from tests.test_images import b64, png
from tests.test_thinking import THINKING_TEMPLATE
from tests.test_tool_calls import wait_catalogued
from tests.model_factory import write_model
from workers.fake_engine import FakeEngine

pytestmark = pytest.mark.asyncio(loop_scope="session")

THOUGHT = "The user wants the weather; I should call the tool."
REPLY = f'<think>{THOUGHT}</think>Checking.\n<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n</tool_call>'
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
FUNCTION = {"name": "get_weather", "description": "Weather in a city", "parameters": SCHEMA}
IMAGE = b64(png(2, 2))


# Keys vLLama adds on purpose, each documented in the README: which stores hold a model and
# which workers run it (the cluster's view), a model's capabilities in its list entry, and an
# OpenAI message's reasoning under the names vLLM's server (reasoning_content) and Ollama's
# (reasoning) use, which the official type has no field for.
EXTENSIONS = {"tags entry": {"stores", "capabilities"}, "ps entry": {"workers"},
              # Ollama's own omitempty fields that the client's types do not declare (yet)
              "show": {"system", "messages", "projector_info", "tensors"},
              "message": {"reasoning", "reasoning_content"}, "delta": {"reasoning", "reasoning_content"}}


def conforms(model: type[BaseModel] | Any, obj: dict[str, Any], where: str = "") -> None:
    """``obj`` validates strictly as ``model`` and has no key ``model`` does not declare but the
    ``EXTENSIONS`` of ``where`` (nested objects are checked by their own calls)."""
    adapter = model if isinstance(model, TypeAdapter) else TypeAdapter(model)
    parsed = adapter.validate_json(json.dumps(obj), strict=True)
    if isinstance(parsed, BaseModel):
        known = {f.alias or name for name, f in type(parsed).model_fields.items()} | EXTENSIONS.get(where, set())
        assert set(obj) <= known, f"{where or type(parsed).__name__}: unknown keys {set(obj) - known}"


def thinking_tools_stack(redis_server, tmp_path, **settings):
    write_model(tmp_path, MODEL, chat_template=THINKING_TEMPLATE)
    return fake_stack(redis_server.url, pull_worker=True, home=tmp_path,
                      engine=FakeEngine(reply=REPLY, chat_template=THINKING_TEMPLATE, vision=True,
                                        special_tokens=("<fim_prefix>", "<fim_suffix>", "<fim_middle>")), **settings)


def ndjson(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def sse_data(text: str) -> list[dict[str, Any]]:
    out = []
    for event in text.split("\n\n")[:-1]:
        data = [line[len("data: "):] for line in event.split("\n") if line.startswith("data: ")][0]
        if data != "[DONE]":
            out.append(json.loads(data))
    return out


OPTIONS = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "num_predict": 64, "stop": ["\n\n\n"],
           "seed": 7, "repeat_penalty": 1.1, "presence_penalty": 0.1, "frequency_penalty": 0.1, "num_ctx": 2048,
           "num_keep": 8}


async def test_ollama(redis_server, tmp_path):
    async with thinking_tools_stack(redis_server, tmp_path) as stack, stack.client() as http:
        await wait_catalogued(stack)
        tool = {"type": "function", "function": FUNCTION}
        chat = {"model": MODEL, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?", "images": [IMAGE]},
            {"role": "assistant", "content": "", "thinking": "Call it.",
             "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "tool_name": "get_weather", "content": "sunny"},
            {"role": "user", "content": "And tomorrow?"}],
            "tools": [tool], "think": True, "format": SCHEMA, "options": OPTIONS, "keep_alive": "5m",
            "logprobs": True, "top_logprobs": 2, "truncate": True, "shift": True}
        for stream in (True, False):
            r = await http.post("/api/chat", json={**chat, "stream": stream})
            assert r.status_code == 200, r.text
            lines = ndjson(r.text) if stream else [r.json()]
            for line in lines:
                conforms(ot.ChatResponse, line)
                conforms(ot.Message, line["message"], "message")
            assert any(line["message"].get("tool_calls") for line in lines)
            assert any(line["message"].get("thinking") for line in lines)

        generate = {"model": MODEL, "prompt": "Why is the sky blue?", "system": "Be brief.", "images": [IMAGE],
                    "think": True, "format": "json", "options": OPTIONS, "keep_alive": 300, "logprobs": True,
                    "top_logprobs": 1, "truncate": False, "shift": False}
        for stream in (True, False):
            r = await http.post("/api/generate", json={**generate, "stream": stream})
            assert r.status_code == 200, r.text
            lines = ndjson(r.text) if stream else [r.json()]
            for line in lines:
                conforms(ot.GenerateResponse, line)
            context = lines[-1]["context"]
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "go on", "context": context,
                                                   "stream": False})
        conforms(ot.GenerateResponse, r.json())
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "raw text", "raw": True, "stream": False})
        conforms(ot.GenerateResponse, r.json())
        for extra in ({"suffix": "return x"}, {"template": "{{ .System }} {{ .Prompt }}", "system": "Be brief."}):
            r = await http.post("/api/generate", json={"model": MODEL, "prompt": "def f(", "stream": False, **extra})
            assert r.status_code == 200, r.text
            conforms(ot.GenerateResponse, r.json())

        # The model-building API: a blob, a model made from another and from files, as the client types them.
        blob = b"not a model, just bytes"
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        assert (await http.post(f"/api/blobs/{digest}", content=blob)).status_code == 201
        assert (await http.head(f"/api/blobs/{digest}")).status_code == 200
        r = await http.post("/api/create", json={
            "model": "made:1b", "from": MODEL, "system": "Be brief.", "template": "{{ .Prompt }}",
            "parameters": {"temperature": 0.2}, "messages": [{"role": "user", "content": "hi"}], "license": "MIT"})
        for line in ndjson(r.text):
            conforms(ot.ProgressResponse, line)
        assert ndjson(r.text)[-1] == {"status": "success"}
        r = await http.post("/api/create", json={"model": "bad:1b", "files": {"model.gguf": digest}, "stream": False})
        assert r.status_code == 400 and set(r.json()) == {"error"}  # the client raises ResponseError(error)

        shown = (await http.post("/api/show", json={"model": MODEL, "verbose": True})).json()
        conforms(ot.ShowResponse, shown, "show")
        assert shown["tensors"] and set(shown["tensors"][0]) == {"name", "type", "shape"}
        listed = (await http.get("/api/tags")).json()
        conforms(ot.ListResponse, listed)
        for entry in listed["models"]:
            conforms(ot.ListResponse.Model, {k: v for k, v in entry.items() if k != "name"}, "tags entry")
            assert entry["name"] == entry["model"]  # Ollama's older name for it, which the type dropped
        running = (await http.get("/api/ps")).json()
        conforms(ot.ProcessResponse, running)
        for entry in running["models"]:
            conforms(ot.ProcessResponse.Model, entry, "ps entry")
        r = await http.post("/api/copy", json={"source": MODEL, "destination": "copy:1b"})
        assert r.status_code == 200
        r = await http.request("DELETE", "/api/delete", json={"model": "copy:1b"})
        assert r.status_code == 200
        r = await http.post("/api/pull", json={"model": "nothing-here-anywhere", "stream": False})
        assert r.status_code == 404 and set(r.json()) == {"error"}  # the client raises ResponseError(error)


async def test_openai_chat_and_completions(redis_server, tmp_path):
    async with thinking_tools_stack(redis_server, tmp_path) as stack, stack.client() as http:
        await wait_catalogued(stack)
        messages = [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE}"}}]},
            {"role": "assistant", "content": None, "reasoning_content": "Call it.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "user", "content": "And tomorrow?", "name": "ann"}]
        body = {"model": MODEL, "messages": messages, "max_completion_tokens": 64, "temperature": 0.7, "top_p": 0.9,
                "stop": ["\n\n\n"], "seed": 7, "presence_penalty": 0.1, "frequency_penalty": 0.1, "n": 2,
                "logprobs": True, "top_logprobs": 2, "tools": [{"type": "function", "function": FUNCTION}],
                "tool_choice": "auto", "parallel_tool_calls": True, "reasoning_effort": "high", "user": "u1"}
        r = await http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        conforms(oc.ChatCompletion, r.json())
        for choice in r.json()["choices"]:
            conforms(oc.chat_completion.Choice, choice, "choice")
            conforms(oc.ChatCompletionMessage, choice["message"], "message")
        r = await http.post("/v1/chat/completions", json={**body, "stream": True,
                                                          "stream_options": {"include_usage": True}})
        for chunk in sse_data(r.text):
            conforms(oc.ChatCompletionChunk, chunk)
            for choice in chunk["choices"]:
                conforms(oc.chat_completion_chunk.ChoiceDelta, choice["delta"], "delta")
        r = await http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}})
        conforms(oc.ChatCompletion, r.json())

        completion = {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 4, "temperature": 0.5, "top_p": 0.9,
                      "stop": "\n", "seed": 1, "presence_penalty": 0.1, "frequency_penalty": 0.1, "n": 2,
                      "logprobs": 2, "user": "u1"}
        r = await http.post("/v1/completions", json=completion)
        conforms(oat.Completion, r.json())
        r = await http.post("/v1/completions", json={**completion, "stream": True,
                                                     "stream_options": {"include_usage": True}})
        for chunk in sse_data(r.text):
            # The client types a streamed chunk as the whole Completion, whose finish_reason may
            # not be null; OpenAI's chunks (and ours) carry null until the last one.
            for choice in chunk["choices"]:
                choice["finish_reason"] = choice["finish_reason"] or "stop"
            conforms(oat.Completion, chunk)
        conforms(oat.Model, (await http.get(f"/v1/models/{MODEL}")).json())
        for model in (await http.get("/v1/models")).json()["data"]:
            conforms(oat.Model, model)


async def test_openai_responses(redis_server, tmp_path):
    async with thinking_tools_stack(redis_server, tmp_path) as stack, stack.client() as http:
        await wait_catalogued(stack)
        body = {"model": MODEL, "instructions": "Be brief.", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"},
                                         {"type": "input_image", "image_url": f"data:image/png;base64,{IMAGE}"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Hm."}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "message", "role": "user", "content": "And tomorrow?"}],
            "tools": [{"type": "function", **FUNCTION, "strict": True}], "tool_choice": "auto",
            "parallel_tool_calls": True, "max_output_tokens": 64, "temperature": 0.7, "top_p": 0.9,
            "reasoning": {"effort": "medium"}, "text": {"format": {"type": "text"}}, "store": True,
            "metadata": {"run": "1"}, "user": "u1"}
        r = await http.post("/v1/responses", json=body)
        assert r.status_code == 200, r.text
        whole = r.json()
        conforms(orr.Response, whole)
        assert [item["type"] for item in whole["output"]] == ["reasoning", "message", "function_call"]
        conforms(orr.Response, (await http.get(f"/v1/responses/{whole['id']}")).json())
        r = await http.post("/v1/responses", json={"model": MODEL, "input": "more", "stream": True,
                                                   "previous_response_id": whole["id"]})
        events = sse_data(r.text)
        assert events[-1]["type"] == "response.completed"
        for event in events:
            conforms(TypeAdapter(orr.ResponseStreamEvent), event)
        r = await http.request("DELETE", f"/v1/responses/{whole['id']}")
        assert r.json() == {"id": whole["id"], "object": "response", "deleted": True}  # the client has no type


async def test_anthropic_messages(redis_server, tmp_path):
    async with thinking_tools_stack(redis_server, tmp_path) as stack, stack.client() as http:
        await wait_catalogued(stack)
        tool = {"name": "get_weather", "description": "Weather in a city", "input_schema": SCHEMA}
        body = {"model": MODEL, "max_tokens": 64, "system": [{"type": "text", "text": "Be brief."}], "messages": [
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMAGE}},
                {"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Call it.", "signature": ""},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                                         {"type": "text", "text": "And tomorrow?"}]}],
            "temperature": 0.7, "top_p": 0.9, "top_k": 20, "stop_sequences": ["\n\n\n"], "tools": [tool],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": False},
            "thinking": {"type": "enabled", "budget_tokens": 1024}, "metadata": {"user_id": "u1"}}
        r = await http.post("/v1/messages", json=body)
        assert r.status_code == 200, r.text
        conforms(at.Message, r.json())
        assert [b["type"] for b in r.json()["content"]] == ["thinking", "text", "tool_use"]
        r = await http.post("/v1/messages", json={**body, "stream": True})
        events = sse_data(r.text)
        assert events[1] == {"type": "ping"}  # the SDK reads pings apart from the message's events
        for event in events[:1] + events[2:]:
            conforms(TypeAdapter(at.RawMessageStreamEvent), event)
        count = {k: body[k] for k in ("model", "system", "messages", "tools", "tool_choice", "thinking")}
        conforms(at.MessageTokensCount, (await http.post("/v1/messages/count_tokens", json=count)).json())
        r = await http.post("/v1/messages", json={"model": MODEL, "messages": body["messages"]})
        assert r.status_code == 400
        conforms(at.ErrorResponse, r.json())
