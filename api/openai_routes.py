"""OpenAI's API: /v1/chat/completions, /v1/completions (SSE or one JSON), /v1/models.

Same queue, same workers as the Ollama endpoints; only the wire format differs. Streams are
Server-Sent Events: a first chunk with the assistant role (chat), content deltas, a chunk
with finish_reason, a usage chunk when stream_options.include_usage is set, then
``data: [DONE]``. Errors use OpenAI's error object (api/errors.py).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from api import ownership
from api.answers import Answer, Output, logprobs_json, merged, respond, submit_all
from api.dispatch import Dispatcher
from api.errors import openai_error, parse_body
from api.images import inline_remote_images
from api.limits import RequestLimits
from api.openai_models import ChatCompletionRequest, CompletionRequest, fan_out
from api.tools import attach_tools
from common import catalog, clock
from common.errors import ModelNotFound
from common.models import canonical_name
from common.protocol import DoneFrame, ThinkingFrame, TokenFrame, TokenLogprob, ToolCallsFrame
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
    headers: dict[str, str] = {}
    limits = RequestLimits.of(dispatcher.settings)
    n = body.choices_per_prompt(limits)
    if isinstance(body, ChatCompletionRequest):
        await inline_remote_images(body, dispatcher.settings)
        job = body.to_job(limits)
        headers = await attach_tools(dispatcher, job, body.model, body.tools, body.tool_choice,
                                     body.parallel_tool_calls)
        prompts = [job]
    else:
        prompts = body.to_jobs(limits)
    jobs = fan_out(prompts, n)
    ownership.stamp(request, jobs)  # usage per API key
    streams = await submit_all(dispatcher, jobs)
    shape = Shape(kind, jobs[0].job_id, body.model, n)
    return await respond(request, streams, whole=None if body.stream else shape.whole,
                         relay=lambda outputs: _relay(shape, outputs, body.include_usage),
                         error=lambda message, status: sse(openai_error(message, status)),
                         media_type=SSE, headers=headers)


class Shape:
    """OpenAI's objects for one request: chat.completion(.chunk) or text_completion, with one
    choice per job (``n`` per prompt)."""

    def __init__(self, kind: Kind, job_id: str, model: str, n: int) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + job_id
        self.model = model
        self.n = n
        self.created = int(clock.now())
        self.text_offsets: dict[int, int] = {}  # completions: characters streamed so far, per choice

    def _base(self, chunk: bool) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "completion" else \
            ("chat.completion.chunk" if chunk else "chat.completion")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, answers: list[Answer]) -> dict[str, Any]:
        return {**self._base(False), "choices": [self._choice(i, a) for i, a in enumerate(answers)],
                "usage": self.usage([a.done for a in answers])}

    def _choice(self, index: int, answer: Answer) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": answer.text}
            if answer.thinking:
                message.update(reasoning_fields(answer.thinking))
            if answer.tool_calls:
                message["content"] = answer.text or None
                message["tool_calls"] = tool_calls_json(answer.tool_calls)
            choice["message"] = message
        else:
            choice["text"] = answer.text
        choice["logprobs"] = self.logprobs(index, answer.logprobs)
        choice["finish_reason"] = finish_reason(answer.done, bool(answer.tool_calls))
        return choice

    def chunk(self, index: int, delta: dict[str, Any] | None = None, text: str = "", finish: str | None = None,
              logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        """A chat chunk carries ``delta``; a completion chunk carries ``text``."""
        choice: dict[str, Any] = {"index": index}
        if self.kind == "chat":
            choice["delta"] = delta or {}
        else:
            choice["text"] = text
        choice["logprobs"] = self.logprobs(index, logprobs)
        choice["finish_reason"] = finish
        self.text_offsets[index] = self.text_offsets.get(index, 0) + len(text)
        return {**self._base(True), "choices": [choice]}

    def logprobs(self, index: int, logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """Chat's ``{"content": [...]}``, or the legacy completions' parallel lists (whose
        text_offset counts on from the text already sent)."""
        if logprobs is None:
            return None
        if self.kind == "chat":
            return {"content": logprobs_json(logprobs), "refusal": None}
        start = self.text_offsets.get(index, 0)
        offsets = list(itertools.accumulate((len(lp.token) for lp in logprobs[:-1]), initial=start))
        return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs], "text_offset": offsets}

    def usage(self, dones: list[DoneFrame]) -> dict[str, int]:
        """Each prompt counted once, however many choices it has."""
        prompt = sum(done.stats.prompt_eval_count for done in dones[::self.n])
        completion = sum(done.stats.eval_count for done in dones)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def usage_chunk(self, dones: list[DoneFrame]) -> dict[str, Any]:
        return {**self._base(True), "choices": [], "usage": self.usage(dones)}


def reasoning_fields(thinking: str) -> dict[str, str]:
    """The reasoning under both names clients read: ``reasoning_content`` (vLLM's server,
    DeepSeek's API) and ``reasoning`` (Ollama's)."""
    return {"reasoning_content": thinking, "reasoning": thinking}


def finish_reason(done: DoneFrame, called_tools: bool) -> str:
    return "tool_calls" if called_tools and done.done_reason == "stop" else done.done_reason


def tool_calls_json(calls: list[ToolCall], streamed: bool = False) -> list[dict[str, Any]]:
    """OpenAI's shape: arguments as JSON text; in a stream each call also says its index."""
    return [{**({"index": i} if streamed else {}), "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for i, c in enumerate(calls)]


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj.encode() if isinstance(obj, str) else orjson.dumps(obj)
    return b"data: " + data + b"\n\n"


async def _relay(shape: Shape, outputs: list[Output], include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events: one per frame, and those of frames that arrived together in one write."""
    if shape.kind == "chat":
        yield b"".join(sse(shape.chunk(index, {"role": "assistant", "content": ""})) for index in range(len(outputs)))
    called_tools: set[int] = set()
    dones: dict[int, DoneFrame] = {}
    async for index, batch in merged(outputs):
        events = []
        for frame in batch:
            if isinstance(frame, TokenFrame):
                events.append(sse(shape.chunk(index, {"content": frame.text}, text=frame.text,
                                              logprobs=frame.logprobs)))
            elif isinstance(frame, ThinkingFrame):
                if shape.kind == "chat":  # completions have no template to think by
                    events.append(sse(shape.chunk(index, reasoning_fields(frame.text))))
            elif isinstance(frame, ToolCallsFrame):
                called_tools.add(index)
                events.append(sse(shape.chunk(index, {"tool_calls": tool_calls_json(frame.calls, streamed=True)})))
            elif isinstance(frame, DoneFrame):
                dones[index] = frame
                events.append(sse(shape.chunk(index, finish=finish_reason(frame, index in called_tools))))
        if events:
            yield b"".join(events)
    if include_usage:
        yield sse(shape.usage_chunk([dones[i] for i in sorted(dones)]))
    yield sse("[DONE]")


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
    entries = await catalog.entries(d.redis)
    served = {name: int(e.manifest.modified_at) for name, e in entries.items()}
    for worker in await d.live_workers(fresh=True):
        for status in worker.loaded:
            served.setdefault(status.name, int(status.loaded_at))
    return served


def _model(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "vllama"}
