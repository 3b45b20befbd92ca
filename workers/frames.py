"""Publishing frames: numbered per job, batched per worker.

Every job of a worker publishes through one ``FrameSink``, which sends whatever frames have
gathered as one pipeline while the previous one is in flight. Under load (a GPU worker may
stream hundreds of requests, tens of thousands of frames a second) this turns one Redis
round trip and socket write per token into one per batch; when idle a frame goes out at
once. Frames of one job keep their order: there is a single sender and batches are FIFO.
An async job's frames are also appended to a list (``vllama:job-frames:<id>``) in the same
pipeline, for the jobs API to read later.

A batch that Redis does not take (a restart, a failover) is sent again until it does, for up
to FINAL_WRITE_PATIENCE_S, so a job outlives a short outage with its frames whole and in
order. A batch that reached Redis before the connection broke may arrive twice; readers skip
a frame whose sequence number they have already seen.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import Redis

from common import keys
from common.tasks import cancel_and_wait, until_redis_answers

log = logging.getLogger(__name__)


class FrameSink:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pending: list[tuple[str, str, FrameLog | None, asyncio.Future[int]]] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._send_loop(), name="frame-sink")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def publish(self, channel: str, data: str, keep: FrameLog | None = None) -> int:
        """Publish one message (and append it to ``keep``'s list); returns how many
        subscribers received it."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((channel, data, keep, future))
        self._ready.set()
        return await future

    async def _send(self, batch: list[tuple[str, str, FrameLog | None, asyncio.Future[int]]]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel, data, keep, _ in batch:
                pipe.publish(channel, data)
                if keep is not None:
                    keep.append(pipe, data)
            return await pipe.execute()

    async def _send_loop(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                replies = await until_redis_answers(lambda: self._send(batch), "publishing frames")
            except asyncio.CancelledError:
                for *_, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - each waiting job gets the error
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            counts = iter(replies)
            for _, _, keep, future in batch:
                count = next(counts)
                if keep is not None:
                    for _ in range(keep.REPLIES):
                        next(counts)
                if not future.done():
                    future.set_result(count)


class FrameLog:
    """Where an async job's frames are kept, and for how long after the latest."""

    REPLIES = 2  # commands append() adds to a pipeline

    def __init__(self, job_id: str, ttl_s: int) -> None:
        self.key = keys.job_frames(job_id)
        self.ttl_s = ttl_s

    def append(self, pipe: Any, data: str) -> None:
        pipe.rpush(self.key, data)
        pipe.expire(self.key, self.ttl_s)


class FramePublisher:
    """One job's frames, with consecutive sequence numbers (kept in ``keep`` too, if given)."""

    def __init__(self, sink: FrameSink, job_id: str, keep: FrameLog | None = None) -> None:
        self._sink = sink
        self.channel = keys.frames_channel(job_id)
        self.keep = keep
        self._seq = 0

    def next(self, frame_type: type, **fields: Any) -> str:
        """The next frame, numbered, as JSON (for callers that publish it themselves)."""
        frame = frame_type(seq=self._seq, **fields)
        self._seq += 1
        return frame.model_dump_json()

    async def send(self, frame_type: type, **fields: Any) -> int:
        """Publish a frame; returns how many subscribers received it."""
        return await self._sink.publish(self.channel, self.next(frame_type, **fields), self.keep)
