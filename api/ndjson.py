"""Ollama's response objects and NDJSON framing."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from api.answers import ending_in_band, logprobs_json
from common.protocol import DoneFrame, TokenLogprob
from common.tool_calls import ToolCall

NDJSON = "application/x-ndjson"

# Line separators that str.splitlines() (and so ollama-python's line reader) splits on,
# but JSON allows raw inside strings; escape them so every line is one object.
_LINE_BREAKS = {"\u2028".encode(): b"\\u2028", "\u2029".encode(): b"\\u2029", "\u0085".encode(): b"\\u0085"}
_second: tuple[int, str] = (0, "")  # (a second since the epoch, its RFC 3339 text up to the ".")


def now_rfc3339() -> str:
    """Now, as Ollama's created_at (UTC, to the microsecond). The date and time of day are
    formatted once per second: a busy API writes tens of thousands of lines a second, each at
    a different microsecond, and formatting a whole time costs more than the rest of a line."""
    global _second
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)))
    return f"{_second[1]}{int((now - second) * 1_000_000):06d}Z"


def line(obj: dict[str, Any]) -> bytes:
    data = orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
    for raw, escaped in _LINE_BREAKS.items():
        if raw in data:
            data = data.replace(raw, escaped)
    return data


class TokenLines:
    """The lines of one stream's tokens without logprobs (the hot path: one per token),
    byte for byte what ``line(generate_chunk(...))`` or ``line(chat_chunk(...))`` gives, made
    from parts built once per stream."""

    def __init__(self, model: str, kind: str) -> None:
        self._head = b'{"model":' + orjson.dumps(model) + b',"created_at":"'
        if kind == "generate":
            self._middle, self._end = b'","response":', b',"done":false}\n'
        else:
            self._middle, self._end = b'","message":{"role":"assistant","content":', b'},"done":false}\n'

    def __call__(self, text: str) -> bytes:
        data = self._head + now_rfc3339().encode() + self._middle + orjson.dumps(text) + self._end
        if "\u2028" in text or "\u2029" in text or "\u0085" in text:
            for raw, escaped in _LINE_BREAKS.items():
                data = data.replace(raw, escaped)
        return data


def error_line(message: str, _status: int = 500) -> bytes:
    """How an Ollama stream ends when it fails after its first line (the status is already sent)."""
    return line({"error": message})


def generate_chunk(model: str, text: str, logprobs: list[TokenLogprob] | None = None,
                   thinking: str = "") -> dict[str, Any]:
    body = {"model": model, "created_at": now_rfc3339(), "response": text, "done": False}
    if thinking:
        body["thinking"] = thinking
    return _with_logprobs(body, logprobs)


def chat_chunk(model: str, text: str, tool_calls: list[ToolCall] | None = None,
               logprobs: list[TokenLogprob] | None = None, thinking: str = "") -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking:
        message["thinking"] = thinking
    if tool_calls:
        message["tool_calls"] = tool_calls_json(tool_calls)
    return _with_logprobs({"model": model, "created_at": now_rfc3339(), "message": message, "done": False}, logprobs)


def _with_logprobs(body: dict[str, Any], logprobs: list[TokenLogprob] | None) -> dict[str, Any]:
    if logprobs is not None:
        body["logprobs"] = logprobs_json(logprobs)
    return body


def tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Ollama's shape: arguments as an object, and the call's position as function.index."""
    return [{"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(calls)]


def final_fields(done: DoneFrame) -> dict[str, Any]:
    return {"done": True, "done_reason": done.done_reason, **done.stats.model_dump()}


def thinking_chunk(model: str, kind: str, thinking: str) -> dict[str, Any]:
    """A piece of the model's reasoning, in a chunk of its own with empty content."""
    return generate_chunk(model, "", thinking=thinking) if kind == "generate" else \
        chat_chunk(model, "", thinking=thinking)


def generate_final(model: str, done: DoneFrame, text: str = "",
                   logprobs: list[TokenLogprob] | None = None, thinking: str = "") -> dict[str, Any]:
    body = {**generate_chunk(model, text, logprobs, thinking), **final_fields(done)}
    if done.context is not None:
        body["context"] = done.context
    return body


def chat_final(model: str, done: DoneFrame, text: str = "", tool_calls: list[ToolCall] | None = None,
               logprobs: list[TokenLogprob] | None = None, thinking: str = "") -> dict[str, Any]:
    return {**chat_chunk(model, text, tool_calls, logprobs, thinking), **final_fields(done)}


def load_response(kind: str, model: str, reason: str) -> dict[str, Any]:
    """Answer to an empty prompt / empty messages: Ollama's load (or unload) acknowledgement."""
    base = generate_chunk(model, "") if kind == "generate" else chat_chunk(model, "")
    return {**base, "done": True, "done_reason": reason}


async def relay_progress(lines: Any, states: AsyncIterator[Any], retry: str,
                         before: list[dict[str, Any]] | None = None) -> AsyncIterator[bytes]:
    """A pull's or a push's progress as NDJSON: ``before`` (lines already made from its first
    state), then ``lines.lines(state)`` of each later state; once ``lines.error`` is set, that
    error in-band, and the end. ``states`` is closed however the stream ends."""
    async def progress() -> AsyncIterator[bytes]:
        for obj in before or []:
            yield line(obj)
        if lines.error:
            yield error_line(lines.error.message)
            return
        async for state in states:
            for obj in lines.lines(state):
                yield line(obj)
            if lines.error:
                yield error_line(lines.error.message)
                return

    try:
        async for chunk in ending_in_band(progress(), error_line, retry=retry):
            yield chunk
    finally:
        await states.aclose()
