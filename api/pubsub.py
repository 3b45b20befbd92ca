"""One pub/sub connection per API process, shared by every request in flight.

A Redis connection per streaming request would exhaust connections under load; instead a
single reader task receives every frame and hands it to the per-job queue of the request
that subscribed. ``subscribe`` returns only once Redis has confirmed the subscription, so a
job enqueued after it cannot publish into the void.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from common.keys import PREFIX
from common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Kept subscribed so the shared connection always has a subscription (a PubSub with none
# refuses get_message) and exists before the first request.
CONTROL_CHANNEL = f"{PREFIX}:control"
SUBSCRIBE_TIMEOUT_S = 5.0


class FrameMultiplexer:
    def __init__(self, redis: Redis) -> None:
        self._pubsub = redis.pubsub()
        self._queues: dict[str, asyncio.Queue[bytes]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        await self._pubsub.subscribe(CONTROL_CHANNEL)
        self._reader = asyncio.create_task(self._read(), name="frame-multiplexer")

    async def stop(self) -> None:
        await cancel_and_wait(self._reader)
        self._reader = None
        await self._pubsub.aclose()

    @property
    def active(self) -> int:
        return len(self._queues)

    async def subscribe(self, channel: str) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        confirmed = asyncio.Event()
        self._queues[channel] = queue
        self._confirmed[channel] = confirmed
        try:
            await self._pubsub.subscribe(channel)
            await asyncio.wait_for(confirmed.wait(), SUBSCRIBE_TIMEOUT_S)
        except BaseException:
            self._queues.pop(channel, None)
            raise
        finally:
            self._confirmed.pop(channel, None)
        return queue

    async def unsubscribe(self, channel: str) -> None:
        self._queues.pop(channel, None)
        try:
            await self._pubsub.unsubscribe(channel)
        except Exception:  # noqa: BLE001 - the reader reconnects and resubscribes what is left
            log.warning("unsubscribe %s failed", channel, exc_info=True)

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep serving; lost frames show up as seq gaps
                log.exception("pub/sub read failed; retrying")
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            channel = message["channel"]
            if isinstance(channel, bytes):
                channel = channel.decode()
            kind = message["type"]
            if kind == "message":
                queue = self._queues.get(channel)
                if queue is not None:
                    queue.put_nowait(message["data"])
            elif kind == "subscribe":
                event = self._confirmed.get(channel)
                if event is not None:
                    event.set()
