"""Submitted jobs' answers, whatever the wire format: wait for each job's first output (so
an error before it gets a real HTTP status), then either collect the answers whole or relay
them as they stream; the streams are closed (unfinished jobs aborted) however the request
ends. A request is usually one job; OpenAI's ``n`` (and a list of prompts) is one job per
choice, so the choices spread over the batch, or over workers, like any other requests."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from api.disconnect import StreamedAnswer, unless_disconnected
from api.dispatch import Dispatcher, JobStream
from common.errors import VllamaError
from common.protocol import (
    DoneFrame,
    EmbeddingsFrame,
    Frame,
    GenerationJob,
    StartFrame,
    ThinkingFrame,
    TokenFrame,
    TokenLogprob,
    ToolCallsFrame,
)
from common.tool_calls import ToolCall

log = logging.getLogger(__name__)
Batches = AsyncIterator[list[Frame]]  # a job's frames, in batches of those that arrived together
# A job's first batch with output (starting at its first output frame), and the batches after it.
Output = tuple[list[Frame], Batches]
Relay = Callable[[list[Output]], AsyncIterator[bytes]]
ErrorChunk = Callable[[str, int], bytes]  # (message, HTTP status) -> the stream's error chunk


@dataclass
class Answer:
    text: str
    done: DoneFrame
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them
    vectors: list[EmbeddingsFrame] = field(default_factory=list)  # an embedding job's
    thinking: str = ""  # the model's reasoning, apart from its answer


def logprobs_json(logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Per token: its text, UTF-8 bytes and log probability, and the top ones likewise (the
    same shape in Ollama's API and in OpenAI's chat completions)."""
    return [{**_token_json(lp.token, lp.logprob), "top_logprobs": [_token_json(t.token, t.logprob) for t in lp.top]}
            for lp in logprobs]


def _token_json(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


async def submit_all(dispatcher: Dispatcher, jobs: list[GenerationJob], keep_alive: float | None = None
                     ) -> list[JobStream]:
    streams: list[JobStream] = []
    try:
        for job in jobs:
            streams.append(await dispatcher.submit(job, keep_alive))
    except BaseException:
        await close_streams(streams)  # the jobs already queued are withdrawn
        raise
    return streams


async def respond(request: Request, streams: list[JobStream], *,
                  whole: Callable[[list[Answer]], dict[str, Any] | Awaitable[dict[str, Any]]] | None, relay: Relay,
                  error: ErrorChunk, media_type: str, headers: dict[str, str]) -> Response:
    """The whole answers as one JSON object (``whole``, which may be a coroutine function), or
    else the ``relay``'s stream, which ends with an ``error`` chunk if an answer fails once
    streaming has begun."""
    try:
        outputs = [await _first_output_of(request, stream) for stream in streams]
        if whole is not None:
            answers = [await unless_disconnected(request, collect(*output)) for output in outputs]
            await close_streams(streams)
            body = whole(answers)
            return JSONResponse(await body if inspect.isawaitable(body) else body, headers=headers)
    except BaseException:
        await close_streams(streams)
        raise
    return StreamedAnswer(_relayed(relay(outputs), streams, error), media_type=media_type, headers=headers)


async def whole_answer(request: Request, stream: JobStream) -> Answer:
    """One job's whole answer (its stream closed however this ends)."""
    try:
        return await unless_disconnected(request, collect(*await _first_output_of(request, stream)))
    finally:
        await close_streams([stream])


async def _first_output_of(request: Request, stream: JobStream) -> Output:
    batches = stream.batches()
    return await unless_disconnected(request, first_output(batches)), batches


async def batches_of(output: Output) -> Batches:
    """A job's batches from its first output on, up to the one with its DoneFrame."""
    head, rest = output
    batch = head
    while True:
        yield batch
        if isinstance(batch[-1], DoneFrame):
            return
        batch = await anext(rest)


async def singly(frames: AsyncIterator[Frame]) -> Batches:
    """Frames as batches of one (for readers that take frames one by one)."""
    async for frame in frames:
        yield [frame]


async def merged(outputs: list[Output]) -> AsyncIterator[tuple[int, list[Frame]]]:
    """The frame batches of several jobs as they come, each with its job's index, until every
    job is done; an error in any job ends it."""
    if len(outputs) == 1:  # the usual case: no tasks, no extra hop
        async for batch in batches_of(outputs[0]):
            yield 0, batch
        return
    queue: asyncio.Queue[tuple[int, list[Frame] | Exception]] = asyncio.Queue()

    async def pump(index: int, output: Output) -> None:
        try:
            async for batch in batches_of(output):
                await queue.put((index, batch))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            await queue.put((index, exc))

    pumps = [asyncio.create_task(pump(i, output)) for i, output in enumerate(outputs)]
    try:
        remaining = len(outputs)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item[-1], DoneFrame):
                remaining -= 1
            yield index, item
    finally:
        for task in pumps:
            task.cancel()


async def first_output(batches: Batches) -> list[Frame]:
    """Wait past the start frame, so an error before any output gets a real HTTP status."""
    async for batch in batches:
        for i, frame in enumerate(batch):
            if not isinstance(frame, StartFrame):
                return batch[i:]
    raise VllamaError("the answer ended before it began; retry the request")


async def collect(head: list[Frame], rest: Batches) -> Answer:
    parts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    logprobs: list[TokenLogprob] | None = None
    vectors: list[EmbeddingsFrame] = []
    async for batch in batches_of((head, rest)):
        for frame in batch:
            if isinstance(frame, EmbeddingsFrame):
                vectors.append(frame)
            elif isinstance(frame, TokenFrame):
                parts.append(frame.text)
                if frame.logprobs is not None:
                    logprobs = logprobs if logprobs is not None else []
                    logprobs.extend(frame.logprobs)
            elif isinstance(frame, ThinkingFrame):
                thoughts.append(frame.text)
            elif isinstance(frame, ToolCallsFrame):
                calls.extend(frame.calls)
            elif isinstance(frame, DoneFrame):
                return Answer("".join(parts), frame, calls, logprobs, vectors, "".join(thoughts))
    raise VllamaError("the answer ended before it was done; retry the request")


async def ending_in_band(chunks: AsyncIterator[bytes], error: ErrorChunk, retry: str = "retry the request"
                         ) -> AsyncIterator[bytes]:
    """The one in-stream error path: once headers are sent, any failure (ours, or Redis gone
    mid-stream) ends the stream with the API family's ``error`` chunk, as both APIs' streams
    do; a client is never left with a stream that just stops."""
    try:
        async for chunk in chunks:
            yield chunk
    except VllamaError as exc:
        yield error(exc.message, exc.status)
    except Exception as exc:  # noqa: BLE001 - e.g. Redis gone mid-stream: still end with an error
        log.exception("stream failed")
        yield error(f"the answer was interrupted ({exc}); {retry}", 500)


async def _relayed(chunks: AsyncIterator[bytes], streams: list[JobStream], error: ErrorChunk) -> AsyncIterator[bytes]:
    try:
        async for chunk in ending_in_band(chunks, error):
            yield chunk
    finally:
        await close_streams(streams)


async def close_streams(streams: list[JobStream]) -> None:
    # Shielded: this runs while the request is being cancelled (client gone), which is
    # exactly when the jobs must still be aborted and their channels released.
    with anyio.CancelScope(shield=True):
        for stream in streams:
            await stream.close()
