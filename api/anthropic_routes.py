"""Anthropic's Messages API: POST /v1/messages (server-sent events or one message object) and
POST /v1/messages/count_tokens, so the ``anthropic`` SDK and the tools built on it run against
local models.

Same queue, same workers as the other APIs; only the wire format differs. A stream is
Anthropic's event sequence: message_start, a ping, then per content block (thinking, text,
each tool call) content_block_start, its deltas and content_block_stop, then message_delta
(stop_reason and usage) and message_stop. Errors use Anthropic's error object, in the body or
as an ``error`` event once a stream has begun (api/errors.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from api import ownership
from api.anthropic_models import CountTokensRequest, MessagesRequest
from api.answers import Answer, Output, merged, respond, submit_all, whole_answer
from api.dispatch import Dispatcher
from api.errors import anthropic_error, parse_body
from api.images import inline_remote_sources
from api.limits import RequestLimits
from api.ollama_models import new_job_id
from api.tools import attach_tools
from common import clock
from common.protocol import DoneFrame, GenerationJob, ThinkingFrame, TokenFrame, ToolCallsFrame
from common.tool_calls import ToolCall

router = APIRouter(prefix="/v1")
SSE = "text/event-stream"


@router.post("/messages")
async def messages(request: Request) -> Response:
    dispatcher: Dispatcher = request.app.state.dispatcher
    body = await parse_body(request, MessagesRequest)
    await inline_remote_sources(body, dispatcher.settings)
    job = body.to_job(RequestLimits.of(dispatcher.settings))
    headers = await _with_tools(dispatcher, job, body)
    ownership.stamp(request, [job])
    streams = await submit_all(dispatcher, [job])
    shape = MessageShape(job.job_id, body.model)
    return await respond(request, streams, whole=None if body.stream else lambda answers: shape.whole(answers[0]),
                         relay=lambda outputs: _relay(shape, outputs[0]),
                         error=lambda message, status: event("error", anthropic_error(message, status)),
                         media_type=SSE, headers=headers)


@router.post("/messages/count_tokens")
async def count_tokens(request: Request) -> dict[str, int]:
    """The prompt's tokens as the model's template renders it: a job that only tokenizes
    (max_tokens 0: the worker renders and counts, the engine is not asked)."""
    dispatcher: Dispatcher = request.app.state.dispatcher
    body = await parse_body(request, CountTokensRequest)
    await inline_remote_sources(body, dispatcher.settings)
    job = GenerationJob(job_id=new_job_id(), model=body.canonical_model(), kind="chat", think=body.think(),
                        messages=body.chat_messages(RequestLimits.of(dispatcher.settings)), created_at=clock.now())
    job.sampling.max_tokens = 0
    job.sampling.given.add("max_tokens")  # a created model's num_predict must not make it generate
    await _with_tools(dispatcher, job, body)
    ownership.stamp(request, [job])
    [stream] = await submit_all(dispatcher, [job])
    answer = await whole_answer(request, stream)
    return {"input_tokens": answer.done.stats.prompt_eval_count}


async def _with_tools(dispatcher: Dispatcher, job: GenerationJob, body: CountTokensRequest) -> dict[str, str]:
    choice, parallel = body.openai_tool_choice()
    return await attach_tools(dispatcher, job, body.model, body.function_tools(), choice, parallel)


class MessageShape:
    """Anthropic's message object for one job, whole or as the events that build it."""

    def __init__(self, job_id: str, model: str) -> None:
        self.id = "msg_" + job_id
        self.model = model

    def start(self) -> dict[str, Any]:
        """The message before its content (message_start's, and the whole one's base)."""
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}

    def whole(self, answer: Answer) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if answer.thinking:
            content.append({"type": "thinking", "thinking": answer.thinking, "signature": ""})
        if answer.text or not (answer.thinking or answer.tool_calls):
            content.append({"type": "text", "text": answer.text})
        content.extend(tool_use_block(call, call.arguments) for call in answer.tool_calls)
        return {**self.start(), "content": content, **self.ending(answer.done, bool(answer.tool_calls)),
                "usage": usage(answer.done)}

    @staticmethod
    def ending(done: DoneFrame, called_tools: bool) -> dict[str, Any]:
        """stop_reason and stop_sequence."""
        if called_tools and done.done_reason == "stop":
            reason = "tool_use"
        elif done.done_reason == "length":
            reason = "max_tokens"
        else:
            reason = "stop_sequence" if done.stop_sequence else "end_turn"
        return {"stop_reason": reason, "stop_sequence": done.stop_sequence}


def tool_use_block(call: ToolCall, arguments: dict[str, Any]) -> dict[str, Any]:
    """A tool call as a tool_use block, its id in Anthropic's form (the worker's call_<hex>
    becomes toolu_<hex>, so the job record and the answer name the same call)."""
    call_id = call.id if call.id.startswith("toolu_") else "toolu_" + call.id.removeprefix("call_")
    return {"type": "tool_use", "id": call_id, "name": call.name, "input": arguments}


def usage(done: DoneFrame) -> dict[str, int]:
    return {"input_tokens": done.stats.prompt_eval_count, "output_tokens": done.stats.eval_count}


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class _Blocks:
    """The content blocks of a streamed message: one open at a time, numbered as they open."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # the open block's type

    def delta(self, kind: str, delta: dict[str, Any]) -> list[bytes]:
        """A delta to the open block of ``kind`` ("text" or "thinking"), opening one if needed."""
        events = []
        if self.open != kind:
            events += self.close()
            empty = {"type": "text", "text": ""} if kind == "text" else \
                {"type": "thinking", "thinking": "", "signature": ""}
            events.append(self._start(kind, empty))
        events.append(event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                    "delta": delta}))
        return events

    def tool_use(self, call: ToolCall) -> list[bytes]:
        """A whole call: its block, its input as one JSON delta, closed."""
        events = self.close()
        events.append(self._start("tool_use", tool_use_block(call, {})))
        events.append(event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": {
            "type": "input_json_delta", "partial_json": json.dumps(call.arguments, ensure_ascii=False)}}))
        return events + self.close()

    def _start(self, kind: str, block: dict[str, Any]) -> bytes:
        self.index += 1
        self.open = kind
        return event("content_block_start", {"type": "content_block_start", "index": self.index,
                                             "content_block": block})

    def close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [event("content_block_stop", {"type": "content_block_stop", "index": self.index})]


async def _relay(shape: MessageShape, output: Output) -> AsyncIterator[bytes]:
    yield event("message_start", {"type": "message_start", "message": shape.start()}) + \
        event("ping", {"type": "ping"})
    blocks = _Blocks()
    called_tools = False
    async for _, batch in merged([output]):
        events: list[bytes] = []
        for frame in batch:
            if isinstance(frame, TokenFrame) and frame.text:
                events += blocks.delta("text", {"type": "text_delta", "text": frame.text})
            elif isinstance(frame, ThinkingFrame):
                events += blocks.delta("thinking", {"type": "thinking_delta", "thinking": frame.text})
            elif isinstance(frame, ToolCallsFrame):
                called_tools = True
                for call in frame.calls:
                    events += blocks.tool_use(call)
            elif isinstance(frame, DoneFrame):
                if blocks.index < 0:  # an empty answer is still one (empty) text block
                    events += blocks.delta("text", {"type": "text_delta", "text": ""})
                events += blocks.close()
                events.append(event("message_delta", {"type": "message_delta",
                                                      "delta": shape.ending(frame, called_tools),
                                                      "usage": usage(frame)}))
                events.append(event("message_stop", {"type": "message_stop"}))
        if events:
            yield b"".join(events)
