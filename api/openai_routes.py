"""OpenAI's API: /v1/chat/completions, /v1/completions (SSE or one JSON), /v1/models.

Same queue, same workers as the Ollama endpoints; only the wire format differs. Streams are
Server-Sent Events: a first chunk with the assistant role (chat), content deltas, a chunk
with finish_reason, a usage chunk when stream_options.include_usage is set, then
``data: [DONE]``. Errors use OpenAI's error object (api/errors.py).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.answers import Answer, logprobs_json, respond
from api.dispatch import Dispatcher
from api.errors import openai_error, parse_body
from api.openai_models import ChatCompletionRequest, CompletionRequest
from api.tools import attach_tools
from common import catalog
from common.errors import ModelNotFound
from common.models import canonical_name
from common.protocol import DoneFrame, Frame, TokenFrame, TokenLogprob, ToolCallsFrame
from common.tool_calls import ToolCall

router = APIRouter(prefix="/v1")
Kind = Literal["chat", "completion"]
SSE = "text/event-stream"


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _serve(request, await parse_body(request, ChatCompletionRequest), "chat")


@router.post("/completions")
async def completions(request: Request) -> Response:
    return await _serve(request, await parse_body(request, CompletionRequest), "completion")


async def _serve(request: Request, body: ChatCompletionRequest | CompletionRequest, kind: Kind) -> Response:
    dispatcher: Dispatcher = request.app.state.dispatcher
    job = body.to_job()
    headers = {}
    if isinstance(body, ChatCompletionRequest):
        headers = await attach_tools(dispatcher, job, body.model, body.tools, body.tool_choice,
                                     body.parallel_tool_calls)
    stream = await dispatcher.submit(job)
    shape = _Shape(kind, job.job_id, body.model)
    return await respond(request, stream, whole=None if body.stream else shape.whole,
                         relay=lambda first, frames: _relay(shape, first, frames, body.include_usage),
                         error=lambda message, status: sse(openai_error(message, status)),
                         media_type=SSE, headers=headers)


class _Shape:
    """OpenAI's objects for one request: chat.completion(.chunk) or text_completion."""

    def __init__(self, kind: Kind, job_id: str, model: str) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + job_id
        self.model = model
        self.created = int(time.time())
        self.text_offset = 0  # completions: characters streamed so far

    def _base(self, chunk: bool) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "completion" else \
            ("chat.completion.chunk" if chunk else "chat.completion")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, answer: Answer) -> dict[str, Any]:
        finish = finish_reason(answer.done, bool(answer.tool_calls))
        logprobs = self.logprobs(answer.logprobs)
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": answer.text}
            if answer.tool_calls:
                message["content"] = answer.text or None
                message["tool_calls"] = tool_calls_json(answer.tool_calls)
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": answer.text, "logprobs": logprobs, "finish_reason": finish}
        return {**self._base(False), "choices": [choice], "usage": usage(answer.done)}

    def chunk(self, delta: dict[str, Any] | None = None, text: str = "", finish: str | None = None,
              logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        """A chat chunk carries ``delta``; a completion chunk carries ``text``."""
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta or {}, "logprobs": self.logprobs(logprobs), "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": self.logprobs(logprobs), "finish_reason": finish}
            self.text_offset += len(text)
        return {**self._base(True), "choices": [choice]}

    def logprobs(self, logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """Chat's ``{"content": [...]}``, or the legacy completions' parallel lists (whose
        text_offset counts on from the text already sent)."""
        if logprobs is None:
            return None
        if self.kind == "chat":
            return {"content": logprobs_json(logprobs), "refusal": None}
        offsets = list(itertools.accumulate((len(lp.token) for lp in logprobs[:-1]), initial=self.text_offset))
        return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs], "text_offset": offsets}

    def usage_chunk(self, done: DoneFrame) -> dict[str, Any]:
        return {**self._base(True), "choices": [], "usage": usage(done)}


def finish_reason(done: DoneFrame, called_tools: bool) -> str:
    return "tool_calls" if called_tools and done.done_reason == "stop" else done.done_reason


def tool_calls_json(calls: list[ToolCall], streamed: bool = False) -> list[dict[str, Any]]:
    """OpenAI's shape: arguments as JSON text; in a stream each call also says its index."""
    return [{**({"index": i} if streamed else {}), "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for i, c in enumerate(calls)]


def usage(done: DoneFrame) -> dict[str, int]:
    prompt, completion = done.stats.prompt_eval_count, done.stats.eval_count
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _relay(shape: _Shape, first: Frame, frames: AsyncIterator[Frame], include_usage: bool) -> AsyncIterator[bytes]:
    if shape.kind == "chat":
        yield sse(shape.chunk({"role": "assistant", "content": ""}))
    called_tools = False
    frame = first
    while True:
        if isinstance(frame, TokenFrame):
            yield sse(shape.chunk({"content": frame.text}, text=frame.text, logprobs=frame.logprobs))
        elif isinstance(frame, ToolCallsFrame):
            called_tools = True
            yield sse(shape.chunk({"tool_calls": tool_calls_json(frame.calls, streamed=True)}))
        elif isinstance(frame, DoneFrame):
            yield sse(shape.chunk(finish=finish_reason(frame, called_tools)))
            if include_usage:
                yield sse(shape.usage_chunk(frame))
            yield sse("[DONE]")
            return
        frame = await anext(frames)


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model(name, created) for name, created in (await _served(request)).items()]}


@router.get("/models/{model:path}")
async def get_model(request: Request, model: str) -> dict[str, Any]:
    name = canonical_name(model)
    served = await _served(request)
    if name not in served:
        raise ModelNotFound(name, f"The model '{model}' does not exist")
    return _model(name, served[name])


async def _served(request: Request) -> dict[str, int]:
    """What can be served: models on some store, and models workers hold (by name)."""
    d: Dispatcher = request.app.state.dispatcher
    entries = await catalog.entries(d.redis, d.settings.heartbeat_ttl_s)
    served = {name: int(e.manifest.modified_at) for name, e in entries.items()}
    for worker in await d.live_workers(fresh=True):
        for status in worker.loaded:
            served.setdefault(status.name, int(status.loaded_at))
    return served


def _model(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "vllama"}
