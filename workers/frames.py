"""Publishing frames: numbered per job, batched per worker.

Every job of a worker publishes through one ``FrameSink``, which sends whatever frames have
gathered as one pipeline while the previous one is in flight. Under load (a GPU worker may
stream hundreds of requests, tens of thousands of frames a second) this turns one Redis
round trip and socket write per token into one per batch; when idle a frame goes out at
once. Frames of one job keep their order: there is a single sender and batches are FIFO.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import Redis

from common import keys
from common.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class FrameSink:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pending: list[tuple[str, str, asyncio.Future[int]]] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._send_loop(), name="frame-sink")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def publish(self, channel: str, data: str) -> int:
        """Publish one message; returns how many subscribers received it."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((channel, data, future))
        self._ready.set()
        return await future

    async def _send_loop(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for channel, data, _ in batch:
                        pipe.publish(channel, data)
                    counts = await pipe.execute()
            except asyncio.CancelledError:
                for *_, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - each waiting job gets the error
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (*_, future), count in zip(batch, counts):
                if not future.done():
                    future.set_result(count)


class FramePublisher:
    """One job's frames, with consecutive sequence numbers."""

    def __init__(self, sink: FrameSink, job_id: str) -> None:
        self._sink = sink
        self.channel = keys.frames_channel(job_id)
        self._seq = 0

    def next(self, frame_type: type, **fields: Any) -> str:
        """The next frame, numbered, as JSON (for callers that publish it themselves)."""
        frame = frame_type(seq=self._seq, **fields)
        self._seq += 1
        return frame.model_dump_json()

    async def send(self, frame_type: type, **fields: Any) -> int:
        """Publish a frame; returns how many subscribers received it."""
        return await self._sink.publish(self.channel, self.next(frame_type, **fields))
