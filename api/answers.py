"""One submitted job's answer, whatever the wire format: wait for its first output (so an
error before it gets a real HTTP status), then either collect it whole or relay it as it
streams; the stream is closed (the job aborted if unfinished) however the request ends."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.disconnect import unless_disconnected
from api.dispatch import JobStream
from common.errors import VllamaError
from common.protocol import DoneFrame, Frame, StartFrame, TokenFrame, TokenLogprob, ToolCallsFrame
from common.tool_calls import ToolCall

log = logging.getLogger(__name__)
Relay = Callable[[Frame, AsyncIterator[Frame]], AsyncIterator[bytes]]
ErrorChunk = Callable[[str, int], bytes]  # (message, HTTP status) -> the stream's error chunk


@dataclass
class Answer:
    text: str
    done: DoneFrame
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them


def logprobs_json(logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Per token: its text, UTF-8 bytes and log probability, and the top ones likewise (the
    same shape in Ollama's API and in OpenAI's chat completions)."""
    return [{**_token_json(lp.token, lp.logprob), "top_logprobs": [_token_json(t.token, t.logprob) for t in lp.top]}
            for lp in logprobs]


def _token_json(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


async def respond(request: Request, stream: JobStream, *, whole: Callable[[Answer], dict[str, Any]] | None,
                  relay: Relay, error: ErrorChunk, media_type: str, headers: dict[str, str]) -> Response:
    """The whole answer as one JSON object (``whole``), or else the ``relay``'s stream, which
    ends with an ``error`` chunk if the answer fails once streaming has begun."""
    frames = stream.frames()
    try:
        first = await unless_disconnected(request, first_output(frames))
        if whole is not None:
            answer = await unless_disconnected(request, collect(first, frames))
            await close_stream(stream)
            return JSONResponse(whole(answer), headers=headers)
    except BaseException:
        await close_stream(stream)
        raise
    return StreamingResponse(_relayed(relay(first, frames), stream, error), media_type=media_type, headers=headers)


async def first_output(frames: AsyncIterator[Frame]) -> Frame:
    """Wait past the start frame, so an error before any output gets a real HTTP status."""
    async for frame in frames:
        if not isinstance(frame, StartFrame):
            return frame
    raise VllamaError("the answer ended before it began; retry the request")


async def collect(first: Frame, frames: AsyncIterator[Frame]) -> Answer:
    parts: list[str] = []
    calls: list[ToolCall] = []
    logprobs: list[TokenLogprob] | None = None
    frame = first
    while not isinstance(frame, DoneFrame):
        if isinstance(frame, TokenFrame):
            parts.append(frame.text)
            if frame.logprobs is not None:
                logprobs = logprobs if logprobs is not None else []
                logprobs.extend(frame.logprobs)
        elif isinstance(frame, ToolCallsFrame):
            calls.extend(frame.calls)
        frame = await anext(frames)
    return Answer("".join(parts), frame, calls, logprobs)


async def _relayed(chunks: AsyncIterator[bytes], stream: JobStream, error: ErrorChunk) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    except VllamaError as exc:
        # Headers are sent: the error travels in-band, as both APIs' streams do.
        yield error(exc.message, exc.status)
    except Exception as exc:  # noqa: BLE001 - e.g. Redis gone mid-stream: still end with an error
        log.exception("stream failed")
        yield error(f"the answer was interrupted ({exc}); retry the request", 500)
    finally:
        await close_stream(stream)


async def close_stream(stream: JobStream) -> None:
    # Shielded: this runs while the request is being cancelled (client gone), which is
    # exactly when the job must still be aborted and the channel released.
    with anyio.CancelScope(shield=True):
        await stream.close()
