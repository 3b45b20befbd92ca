"""Ollama's native generation endpoints: /api/generate and /api/chat."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api import ndjson, ownership
from api.answers import Answer, Batches, batches_of, respond
from api.disconnect import unless_disconnected
from api.dispatch import Dispatcher
from api.errors import parse_body
from api.limits import RequestLimits
from api.ollama_models import ChatRequest, GenerateRequest
from api.tools import attach_tools
from common import clock
from common.protocol import DoneFrame, ThinkingFrame, TokenFrame, ToolCallsFrame

router = APIRouter()
Kind = Literal["generate", "chat"]


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    return await _serve(request, await parse_body(request, GenerateRequest), "generate")


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    return await _serve(request, await parse_body(request, ChatRequest), "chat")


async def _serve(request: Request, body: GenerateRequest | ChatRequest, kind: Kind) -> Response:
    dispatcher: Dispatcher = request.app.state.dispatcher
    model = body.canonical_model()
    keep_alive = body.keep_alive_s()
    if body.is_load_only():
        return JSONResponse(await _load_only(request, dispatcher, model, keep_alive, kind, body.model))

    job = body.to_job(RequestLimits.of(dispatcher.settings))
    headers = await attach_tools(dispatcher, job, body.model, body.tools) if isinstance(body, ChatRequest) else {}
    ownership.stamp(request, [job])  # usage per API key
    stream = await dispatcher.submit(job, keep_alive)
    whole = (lambda answers: _whole(body.model, kind, answers[0])) if not body.stream else None
    return await respond(request, [stream], whole=whole, relay=lambda outputs: ndjson_answer(body.model, kind, batches_of(outputs[0])),
                         error=ndjson.error_line,
                         media_type=ndjson.NDJSON, headers=headers)


async def _load_only(request: Request, dispatcher: Dispatcher, model: str, keep_alive: float | None,
                     kind: Kind, shown: str) -> dict:
    """An empty prompt (or no messages): load the model, or with keep_alive 0 unload it."""
    return ndjson.load_response(kind, shown, await load_or_unload(request, dispatcher, model, keep_alive))


async def load_or_unload(request: Request, dispatcher: Dispatcher, model: str, keep_alive: float | None
                         ) -> Literal["load", "unload"]:
    """What a request with nothing to run does: load the model, or with keep_alive 0 unload it."""
    loader = dispatcher.loader
    if keep_alive == 0:
        await unless_disconnected(request, loader.unload(model))
        return "unload"
    since = clock.now()
    await dispatcher.ensure_served(model)  # 404 before anything is written for an unknown model
    await loader.set_keep_alive(model, keep_alive)
    await unless_disconnected(request, loader.wait_loaded(model, since))
    return "load"


def _whole(model: str, kind: Kind, answer: Answer) -> dict:
    if kind == "generate":
        return ndjson.generate_final(model, answer.done, answer.text, answer.logprobs, answer.thinking)
    return ndjson.chat_final(model, answer.done, answer.text, answer.tool_calls, answer.logprobs, answer.thinking)


async def ndjson_answer(model: str, kind: str, batches: Batches) -> AsyncIterator[bytes]:
    """An answer's frames as /api/generate or /api/chat stream them, up to the final chunk:
    a line per frame, and the lines of frames that arrived together in one write."""
    final = ndjson.generate_final if kind == "generate" else ndjson.chat_final
    token_line = ndjson.TokenLines(model, kind)
    async for batch in batches:
        lines = []
        for frame in batch:
            if isinstance(frame, TokenFrame):
                if frame.logprobs is None:
                    lines.append(token_line(frame.text))
                elif kind == "generate":
                    lines.append(ndjson.line(ndjson.generate_chunk(model, frame.text, frame.logprobs)))
                else:
                    lines.append(ndjson.line(ndjson.chat_chunk(model, frame.text, logprobs=frame.logprobs)))
            elif isinstance(frame, ThinkingFrame):
                lines.append(ndjson.line(ndjson.thinking_chunk(model, kind, frame.text)))
            elif isinstance(frame, ToolCallsFrame):
                # As Ollama: the calls in a chunk of their own, with empty content.
                lines.append(ndjson.line(ndjson.chat_chunk(model, "", frame.calls)))
            elif isinstance(frame, DoneFrame):
                lines.append(ndjson.line(final(model, frame)))
                yield b"".join(lines)
                return
        if lines:
            yield b"".join(lines)
