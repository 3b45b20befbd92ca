"""Ollama's response objects and NDJSON framing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from common.protocol import DoneFrame
from common.tool_calls import ToolCall

NDJSON = "application/x-ndjson"

# Line separators that str.splitlines() (and so ollama-python's line reader) splits on,
# but JSON allows raw inside strings; escape them so every line is one object.
_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\u0085": "\\u0085"}


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dumps(obj: dict[str, Any]) -> str:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for raw, escaped in _LINE_BREAKS.items():
        if raw in text:
            text = text.replace(raw, escaped)
    return text


def line(obj: dict[str, Any]) -> bytes:
    return (dumps(obj) + "\n").encode()


def generate_chunk(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "created_at": now_rfc3339(), "response": text, "done": False}


def chat_chunk(model: str, text: str, tool_calls: list[ToolCall] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls_json(tool_calls)
    return {"model": model, "created_at": now_rfc3339(), "message": message, "done": False}


def tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Ollama's shape: arguments as an object, and the call's position as function.index."""
    return [{"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(calls)]


def final_fields(done: DoneFrame) -> dict[str, Any]:
    return {"done": True, "done_reason": done.done_reason, **done.stats.model_dump()}


def generate_final(model: str, done: DoneFrame, text: str = "") -> dict[str, Any]:
    body = {**generate_chunk(model, text), **final_fields(done)}
    if done.context is not None:
        body["context"] = done.context
    return body


def chat_final(model: str, done: DoneFrame, text: str = "", tool_calls: list[ToolCall] | None = None) -> dict[str, Any]:
    return {**chat_chunk(model, text, tool_calls), **final_fields(done)}


def load_response(kind: str, model: str, reason: str) -> dict[str, Any]:
    """Answer to an empty prompt / empty messages: Ollama's load (or unload) acknowledgement."""
    base = generate_chunk(model, "") if kind == "generate" else chat_chunk(model, "")
    return {**base, "done": True, "done_reason": reason}
