"""OpenAI's API: /v1/chat/completions, /v1/completions (SSE or one JSON), /v1/models.

Same queue, same workers as the Ollama endpoints; only the wire format differs. Streams are
Server-Sent Events: a first chunk with the assistant role (chat), content deltas, a chunk
with finish_reason, a usage chunk when stream_options.include_usage is set, then
``data: [DONE]``. Errors use OpenAI's error object (api/errors.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.disconnect import unless_disconnected
from api.dispatch import Dispatcher, JobStream
from api.errors import openai_error, parse_body
from api.ollama_routes import close_stream, collect, first_output
from api.openai_models import ChatCompletionRequest, CompletionRequest
from api.tools import tools_headers
from common import catalog
from common.errors import ModelNotFound, VllamaError
from common.models import canonical_name
from common.protocol import DoneFrame, Frame, TokenFrame

log = logging.getLogger(__name__)
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
    headers = tools_headers(body.model, getattr(body, "tools", None), getattr(body, "tool_choice", None),
                            dispatcher.settings.strict_tools)
    job = body.to_job()
    stream = await dispatcher.submit(job)
    frames = stream.frames()
    shape = _Shape(kind, job.job_id, body.model)
    try:
        first = await unless_disconnected(request, first_output(frames))
        if not body.stream:
            text, done = await unless_disconnected(request, collect(first, frames))
            await close_stream(stream)
            return JSONResponse(shape.whole(text, done), headers=headers)
    except BaseException:
        await close_stream(stream)
        raise
    return StreamingResponse(_relay(shape, first, frames, stream, body.include_usage), media_type=SSE,
                             headers=headers)


class _Shape:
    """OpenAI's objects for one request: chat.completion(.chunk) or text_completion."""

    def __init__(self, kind: Kind, job_id: str, model: str) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + job_id
        self.model = model
        self.created = int(time.time())

    def _base(self, chunk: bool) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "completion" else \
            ("chat.completion.chunk" if chunk else "chat.completion")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, text: str, done: DoneFrame) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": done.done_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.done_reason}
        return {**self._base(False), "choices": [choice], "usage": usage(done)}

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else \
                ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._base(True), "choices": [choice]}

    def usage_chunk(self, done: DoneFrame) -> dict[str, Any]:
        return {**self._base(True), "choices": [], "usage": usage(done)}


def usage(done: DoneFrame) -> dict[str, int]:
    prompt, completion = done.stats.prompt_eval_count, done.stats.eval_count
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _relay(shape: _Shape, first: Frame, frames: AsyncIterator[Frame], stream: JobStream,
                 include_usage: bool) -> AsyncIterator[bytes]:
    try:
        if shape.kind == "chat":
            yield sse(shape.chunk(role=True))
        frame = first
        while True:
            if isinstance(frame, TokenFrame):
                yield sse(shape.chunk(frame.text))
            elif isinstance(frame, DoneFrame):
                yield sse(shape.chunk(finish=frame.done_reason))
                if include_usage:
                    yield sse(shape.usage_chunk(frame))
                yield sse("[DONE]")
                return
            frame = await anext(frames)
    except VllamaError as exc:
        # Headers are sent: the error travels in-band, as OpenAI's streams do.
        yield sse(openai_error(exc.message, exc.status))
    except Exception as exc:  # noqa: BLE001 - e.g. Redis gone mid-stream: still end with an error
        log.exception("stream failed")
        yield sse(openai_error(f"the answer was interrupted ({exc}); retry the request", 500))
    finally:
        await close_stream(stream)


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
