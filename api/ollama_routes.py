"""Ollama's native generation endpoints: /api/generate and /api/chat."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api import ndjson
from api.errors import parse_body
from api.disconnect import unless_disconnected
from api.dispatch import Dispatcher, JobStream
from api.ollama_models import ChatRequest, GenerateRequest
from api.tools import tools_headers
from common.errors import VllamaError
from common.protocol import DoneFrame, Frame, StartFrame, TokenFrame

log = logging.getLogger(__name__)
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

    headers = tools_headers(body.model, getattr(body, "tools", None), None, dispatcher.settings.strict_tools)
    stream = await dispatcher.submit(body.to_job(), keep_alive)
    frames = stream.frames()
    try:
        first = await unless_disconnected(request, first_output(frames))
        if not body.stream:
            text, done = await unless_disconnected(request, collect(first, frames))
            render = ndjson.generate_final if kind == "generate" else ndjson.chat_final
            await close_stream(stream)
            return JSONResponse(render(body.model, done, text), headers=headers)
    except BaseException:
        await close_stream(stream)
        raise
    return StreamingResponse(_relay(body.model, kind, first, frames, stream), media_type=ndjson.NDJSON,
                             headers=headers)


async def _load_only(request: Request, dispatcher: Dispatcher, model: str, keep_alive: float | None,
                     kind: Kind, shown: str) -> dict:
    """An empty prompt (or no messages): load the model, or with keep_alive 0 unload it."""
    loader = dispatcher.loader
    if keep_alive == 0:
        await unless_disconnected(request, loader.unload(model))
        return ndjson.load_response(kind, shown, "unload")
    since = time.time()
    await dispatcher.ensure_served(model)  # 404 before anything is written for an unknown model
    await loader.set_keep_alive(model, keep_alive)
    await unless_disconnected(request, loader.wait_loaded(model, since))
    return ndjson.load_response(kind, shown, "load")


async def first_output(frames: AsyncIterator[Frame]) -> TokenFrame | DoneFrame:
    """Wait past the start frame, so an error before any output gets a real HTTP status."""
    async for frame in frames:
        if not isinstance(frame, StartFrame):
            return frame
    raise VllamaError("the answer ended before it began; retry the request")


async def collect(first: Frame, frames: AsyncIterator[Frame]) -> tuple[str, DoneFrame]:
    parts: list[str] = []
    frame = first
    while not isinstance(frame, DoneFrame):
        if isinstance(frame, TokenFrame):
            parts.append(frame.text)
        frame = await anext(frames)
    return "".join(parts), frame


async def _relay(
    model: str, kind: Kind, first: Frame, frames: AsyncIterator[Frame], stream: JobStream
) -> AsyncIterator[bytes]:
    chunk = ndjson.generate_chunk if kind == "generate" else ndjson.chat_chunk
    final = ndjson.generate_final if kind == "generate" else ndjson.chat_final
    try:
        frame = first
        while True:
            if isinstance(frame, TokenFrame):
                yield ndjson.line(chunk(model, frame.text))
            elif isinstance(frame, DoneFrame):
                yield ndjson.line(final(model, frame))
                return
            frame = await anext(frames)
    except VllamaError as exc:
        # Headers are sent: the error travels in-band, as Ollama does.
        yield ndjson.line({"error": exc.message})
    except Exception as exc:  # noqa: BLE001 - e.g. Redis gone mid-stream: still end with an error line
        log.exception("stream failed")
        yield ndjson.line({"error": f"the answer was interrupted ({exc}); retry the request"})
    finally:
        await close_stream(stream)


async def close_stream(stream: JobStream) -> None:
    # Shielded: this runs while the request is being cancelled (client gone), which is
    # exactly when the job must still be aborted and the channel released.
    with anyio.CancelScope(shield=True):
        await stream.close()
