"""OpenAI's Responses API: POST /v1/responses (the typed event stream or one response object),
GET and DELETE /v1/responses/{id}.

Same queue, same workers as chat completions: a response is one chat job. The answer's output
items are, in order, a reasoning item (the model's thinking, if any), a message with its
output_text, and a function_call per tool call. A stream is OpenAI's typed events, each with
its sequence_number: response.created and response.in_progress, then per item
output_item.added, its parts and deltas (output_text, reasoning_text, function call
arguments) and output_item.done, then response.completed (response.incomplete when
max_output_tokens cut it short).

With ``store`` (the default) the response is kept in Redis (keys.response) for
VLLAMA_KEEP_RESULT_S, as job records are, so GET can read it again and
``previous_response_id`` can continue the conversation: each stored response holds its own
input and output as chat messages and the id of the one it continued, and the conversation is
rebuilt by walking that chain (so no response stores the whole history again).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from api import ownership
from api.answers import Answer, Output, merged, respond, submit_all
from api.dispatch import Dispatcher
from api.errors import openai_error, parse_body
from api.images import inline_remote_inputs
from api.limits import RequestLimits
from api.ollama_models import new_job_id
from api.responses_models import ResponsesRequest
from api.tools import attach_tools
from common import clock, keys
from common.errors import BadRequest, NotFound
from common.protocol import ChatMessage, DoneFrame, GenerationJob, ThinkingFrame, TokenFrame, ToolCallsFrame
from common.tool_calls import ToolCall

router = APIRouter(prefix="/v1")
SSE = "text/event-stream"
MAX_CHAIN = 1000  # responses one conversation may continue through


class StoredResponse(BaseModel):
    """What keys.response holds: the response as answered, and the conversation's part in it."""

    response: dict[str, Any]
    input: list[ChatMessage]  # this request's input (instructions excluded: they are not carried on)
    output: ChatMessage  # the answer, as the next turn's history holds it
    previous: str | None = None
    owner: str | None = None


@router.post("/responses")
async def create_response(request: Request) -> Response:
    dispatcher: Dispatcher = request.app.state.dispatcher
    body = await parse_body(request, ResponsesRequest)
    limits = RequestLimits.of(dispatcher.settings)
    await inline_remote_inputs(body, dispatcher.settings)
    history = await _history(request, body.previous_response_id)
    new_input = body.input_messages(history)
    lead = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    messages = [*lead, *history, *new_input]
    body.check(messages, limits)
    job = GenerationJob(job_id=new_job_id(), model=body.canonical_model(), kind="chat", messages=messages,
                        think=body.think(), truncate=body.truncation == "auto", sampling=body.sampling(),
                        created_at=clock.now())
    headers = await attach_tools(dispatcher, job, body.model, body.function_tools(), body.chat_tool_choice(),
                                 body.parallel_tool_calls)
    ownership.stamp(request, [job])
    streams = await submit_all(dispatcher, [job])
    shape = ResponseShape(job.job_id, body)

    async def store(answer: Answer, obj: dict[str, Any]) -> None:
        if body.store:
            stored = StoredResponse(response=obj, input=new_input, output=_as_message(answer),
                                    previous=body.previous_response_id, owner=ownership.owner_of(request))
            await dispatcher.redis.set(keys.response(shape.id), stored.model_dump_json(),
                                       ex=dispatcher.settings.keep_result_s)

    async def whole(answers: list[Answer]) -> dict[str, Any]:
        obj = shape.whole(answers[0])
        await store(answers[0], obj)
        return obj

    return await respond(request, streams, whole=None if body.stream else whole,
                         relay=lambda outputs: _relay(shape, outputs[0], store),
                         error=lambda message, status: shape.error(message, status),
                         media_type=SSE, headers=headers)


@router.get("/responses/{response_id}")
async def get_response(request: Request, response_id: str) -> dict[str, Any]:
    return (await _stored(request, response_id)).response


@router.delete("/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> dict[str, Any]:
    await _stored(request, response_id)
    await request.app.state.dispatcher.redis.delete(keys.response(response_id))
    return {"id": response_id, "object": "response", "deleted": True}


async def _stored(request: Request, response_id: str) -> StoredResponse:
    dispatcher: Dispatcher = request.app.state.dispatcher
    raw = await dispatcher.redis.get(keys.response(response_id))
    missing = NotFound(f"Response with id '{response_id}' not found (stored responses are kept "
                       f"{dispatcher.settings.keep_result_s} s, and only with store: true)")
    if raw is None:
        raise missing
    stored = StoredResponse.model_validate_json(raw)
    ownership.require(request, stored.owner, missing)
    return stored


async def _history(request: Request, previous_id: str | None) -> list[ChatMessage]:
    """The conversation up to and including ``previous_id``'s answer, oldest first."""
    turns: list[list[ChatMessage]] = []
    while previous_id is not None:
        if len(turns) >= MAX_CHAIN:
            raise BadRequest(f"previous_response_id continues a chain of more than {MAX_CHAIN} responses; "
                             "start a new conversation with the history as input")
        stored = await _stored(request, previous_id)
        turns.append([*stored.input, stored.output])
        previous_id = stored.previous
    return [message for turn in reversed(turns) for message in turn]


def _as_message(answer: Answer) -> ChatMessage:
    return ChatMessage(role="assistant", content=answer.text, thinking=answer.thinking, tool_calls=answer.tool_calls)


class ResponseShape:
    """The response object for one job, whole or as the events that build it."""

    def __init__(self, job_id: str, body: ResponsesRequest) -> None:
        self.id = "resp_" + job_id
        self.job_id = job_id
        self.body = body
        self.created_at = int(clock.now())
        self.sequence = 0

    def base(self, status: str, output: list[dict[str, Any]], done: DoneFrame | None = None) -> dict[str, Any]:
        b = self.body
        incomplete = done is not None and done.done_reason == "length"
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": "incomplete" if incomplete else status, "model": b.model, "output": output,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "metadata": b.metadata,
            "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": b.previous_response_id, "reasoning": b.reasoning or {"effort": None},
            "temperature": 1.0 if b.temperature is None else b.temperature,
            "text": b.text or {"format": {"type": "text"}},
            "tool_choice": b.tool_choice if b.tool_choice is not None else "auto", "tools": b.tools or [],
            "top_p": 1.0 if b.top_p is None else b.top_p, "truncation": b.truncation or "disabled",
            "usage": None if done is None else _usage(done), "user": b.user,
        }

    def whole(self, answer: Answer) -> dict[str, Any]:
        output = []
        if answer.thinking:
            output.append(self.reasoning_item(answer.thinking))
        if answer.text or not answer.tool_calls:
            output.append(self.message_item(answer.text))
        output.extend(self.call_item(call) for call in answer.tool_calls)
        return self.base("completed", output, answer.done)

    def reasoning_item(self, text: str) -> dict[str, Any]:
        return {"type": "reasoning", "id": "rs_" + self.job_id, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}

    def message_item(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = [] if status == "in_progress" else [_text_part(text)]
        return {"type": "message", "id": "msg_" + self.job_id, "status": status, "role": "assistant",
                "content": content}

    @staticmethod
    def call_item(call: ToolCall, arguments: str | None = None) -> dict[str, Any]:
        return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
                "name": call.name, "status": "completed" if arguments is None else "in_progress",
                "arguments": json.dumps(call.arguments, ensure_ascii=False) if arguments is None else arguments}

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def error(self, message: str, status: int) -> bytes:
        """The stream's error event (OpenAI's shape: code, message, param)."""
        detail = openai_error(message, status)["error"]
        return self.event("error", code=detail["code"] or detail["type"], message=message, param=None)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(done: DoneFrame) -> dict[str, Any]:
    prompt, output = done.stats.prompt_eval_count, done.stats.eval_count
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + output}


class _Items:
    """The output items of a streamed response: one open at a time (reasoning or message),
    numbered as they open; what each held, for the final response."""

    def __init__(self, shape: ResponseShape) -> None:
        self.shape = shape
        self.output: list[dict[str, Any]] = []
        self.open: str | None = None
        self.text = ""
        self.thinking = ""

    def delta(self, kind: str, text: str) -> list[bytes]:
        """Text for the open item of ``kind`` ("message" or "reasoning"), opening one if needed."""
        ev = self.shape.event
        events = []
        if self.open != kind:
            events += self.close()
            self.open = kind
            index = len(self.output)
            if kind == "message":
                item = self.shape.message_item("", status="in_progress")
                events.append(ev("response.output_item.added", output_index=index, item=item))
                events.append(ev("response.content_part.added", item_id=item["id"], output_index=index,
                                 content_index=0, part=_text_part("")))
            else:
                item = {**self.shape.reasoning_item(""), "content": [], "status": "in_progress"}
                events.append(ev("response.output_item.added", output_index=index, item=item))
            self.output.append(item)
        item_id, index = self.output[-1]["id"], len(self.output) - 1
        if kind == "message":
            self.text += text
            events.append(ev("response.output_text.delta", item_id=item_id, output_index=index, content_index=0,
                             delta=text, logprobs=[]))
        else:
            self.thinking += text
            events.append(ev("response.reasoning_text.delta", item_id=item_id, output_index=index, content_index=0,
                             delta=text))
        return events

    def call(self, call: ToolCall) -> list[bytes]:
        """A whole function call: its item, its arguments as one delta, done."""
        ev = self.shape.event
        events = self.close()
        index = len(self.output)
        item = self.shape.call_item(call)
        arguments = item["arguments"]
        events.append(ev("response.output_item.added", output_index=index,
                         item=self.shape.call_item(call, arguments="")))
        events.append(ev("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                         delta=arguments))
        events.append(ev("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                         name=call.name, arguments=arguments))
        events.append(ev("response.output_item.done", output_index=index, item=item))
        self.output.append(item)
        return events

    def close(self) -> list[bytes]:
        if self.open is None:
            return []
        ev = self.shape.event
        index, kind = len(self.output) - 1, self.open
        self.open = None
        item_id = self.output[index]["id"]
        if kind == "message":
            part = _text_part(self.text)
            item = self.shape.message_item(self.text)
            events = [ev("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                         text=self.text, logprobs=[]),
                      ev("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                         part=part)]
        else:
            item = self.shape.reasoning_item(self.thinking)
            events = [ev("response.reasoning_text.done", item_id=item_id, output_index=index, content_index=0,
                         text=self.thinking)]
        self.output[index] = item
        return [*events, ev("response.output_item.done", output_index=index, item=item)]


async def _relay(shape: ResponseShape, output: Output, store) -> AsyncIterator[bytes]:
    started = shape.base("in_progress", [])
    yield shape.event("response.created", response=started) + shape.event("response.in_progress", response=started)
    items = _Items(shape)
    calls: list[ToolCall] = []
    async for _, batch in merged([output]):
        events: list[bytes] = []
        for frame in batch:
            if isinstance(frame, TokenFrame) and frame.text:
                events += items.delta("message", frame.text)
            elif isinstance(frame, ThinkingFrame):
                events += items.delta("reasoning", frame.text)
            elif isinstance(frame, ToolCallsFrame):
                for call in frame.calls:
                    events += items.call(call)
                calls.extend(frame.calls)
            elif isinstance(frame, DoneFrame):
                if not items.output:  # an empty answer is still one (empty) message
                    events += items.delta("message", "")
                events += items.close()
                final = shape.base("completed", items.output, frame)
                await store(Answer(items.text, frame, calls, thinking=items.thinking), final)
                kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
                events.append(shape.event(kind, response=final))
        if events:
            yield b"".join(events)
