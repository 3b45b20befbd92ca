"""One pub/sub connection per API process, shared by every request in flight.

A Redis connection per streaming request would exhaust connections under load; instead a
single reader task receives every frame and hands it to each subscription of its channel.
Any number of readers may follow one channel (two clients attached to one async job's
stream): each gets its own subscription and every frame, in order. The Redis subscription
is taken by the first reader and dropped with the last. ``subscribe`` returns only once
Redis has confirmed the subscription, so a job enqueued after it cannot publish into the
void.

A reader that does not keep up (a client that stopped reading its response) cannot grow
the process's memory without bound: past ``MAX_BACKLOG`` unread frames its subscription is
marked overflowed and takes no more; the reader learns so on its next read and either
catches up from the frames kept in Redis (async jobs) or ends the client's stream with an
error.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from redis.asyncio import Redis

from common.errors import StreamBroken
from common.keys import PREFIX
from common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Kept subscribed so the shared connection always has a subscription (a PubSub with none
# refuses get_message) and exists before the first request.
CONTROL_CHANNEL = f"{PREFIX}:control"
SUBSCRIBE_TIMEOUT_S = 5.0
# Unread frames one subscription may hold: tens of seconds of a fast stream, a few MB.
MAX_BACKLOG = 20_000


class Overflowed(StreamBroken):
    """The reader fell more than MAX_BACKLOG frames behind; later frames were dropped."""

    def __init__(self) -> None:
        super().__init__("the client read the answer too slowly and fell too far behind; retry the request "
                         "and read the stream as it comes")


class Subscription:
    """One reader's view of a channel: its own queue of raw frames."""

    def __init__(self, channel: str, limit: int) -> None:
        self.channel = channel
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._limit = limit
        self.overflowed = False

    def _deliver(self, data: bytes) -> None:
        if self.overflowed:
            return
        if self._queue.qsize() >= self._limit:
            self.overflowed = True
            while not self._queue.empty():  # free the backlog now; the reader is told on its next get
                self._queue.get_nowait()
            self._queue.put_nowait(b"")  # wakes a reader that waits
            return
        self._queue.put_nowait(data)

    def get_nowait(self) -> bytes:
        """The next frame; QueueEmpty if none is waiting, Overflowed if frames were dropped."""
        if self.overflowed:
            raise Overflowed()
        return self._queue.get_nowait()

    async def get(self, timeout_s: float) -> bytes | None:
        """The next frame, or None after ``timeout_s`` without one; Overflowed if frames were dropped."""
        if self.overflowed:
            raise Overflowed()
        try:
            data = await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            return None
        if self.overflowed:
            raise Overflowed()
        return data


@dataclass
class _Channel:
    subscriptions: set[Subscription] = field(default_factory=set)
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)
    # SUBSCRIBE commands sent whose confirmation has not arrived: a confirmation left over
    # from an earlier subscribe/unsubscribe of the same channel must not confirm this one.
    pending: int = 0


class FrameMultiplexer:
    def __init__(self, redis: Redis, max_backlog: int | None = None) -> None:
        self._pubsub = redis.pubsub()
        self._channels: dict[str, _Channel] = {}
        self._stale_confirmations: dict[str, int] = {}
        self._dropping: set[str] = set()
        self._max_backlog = max_backlog or MAX_BACKLOG
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
        return sum(len(c.subscriptions) for c in self._channels.values())

    async def subscribe(self, channel: str) -> Subscription:
        subscription = Subscription(channel, self._max_backlog)
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel(pending=1)
            state.subscriptions.add(subscription)
            try:
                await self._pubsub.subscribe(channel)
            except BaseException:
                state.pending = 0  # not sent: no confirmation will come
                await self.unsubscribe(subscription)
                raise
        else:
            state.subscriptions.add(subscription)
        try:
            await asyncio.wait_for(asyncio.shield(state.confirmed.wait()), SUBSCRIBE_TIMEOUT_S)
        except BaseException:
            await self.unsubscribe(subscription)
            raise
        return subscription

    async def unsubscribe(self, subscription: Subscription) -> None:
        channel = subscription.channel
        state = self._channels.get(channel)
        if state is None or subscription not in state.subscriptions:
            return
        state.subscriptions.discard(subscription)
        if state.subscriptions:
            return
        del self._channels[channel]
        if state.pending:
            self._stale_confirmations[channel] = self._stale_confirmations.get(channel, 0) + state.pending
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
                state = self._channels.get(channel)
                if state is None:
                    self._drop(channel)
                    continue
                for subscription in state.subscriptions:
                    subscription._deliver(message["data"])
            elif kind == "subscribe" and not self._confirm(channel):
                self._drop(channel)

    def _confirm(self, channel: str) -> bool:
        """A subscription confirmed; False if nobody here wants the channel."""
        stale = self._stale_confirmations.get(channel, 0)
        if stale:
            if stale == 1:
                del self._stale_confirmations[channel]
            else:
                self._stale_confirmations[channel] = stale - 1
            return True
        state = self._channels.get(channel)
        if state is None:
            return channel == CONTROL_CHANNEL
        if state.pending:
            state.pending -= 1
            state.confirmed.set()
        return True

    def _drop(self, channel: str) -> None:
        """Unsubscribe a channel nobody here reads. After a lost connection the client
        subscribes again to every channel it had, including those whose UNSUBSCRIBE failed
        while Redis was away; a worker would count this process as a listener and go on
        generating an answer that its client already gave up on."""
        if channel == CONTROL_CHANNEL or channel in self._dropping:
            return
        self._dropping.add(channel)

        async def unsubscribe() -> None:
            try:
                if channel not in self._channels:
                    await self._pubsub.unsubscribe(channel)
            except Exception:  # noqa: BLE001 - its next message tries again
                log.warning("unsubscribe %s failed", channel, exc_info=True)
            finally:
                self._dropping.discard(channel)

        asyncio.create_task(unsubscribe(), name=f"drop-{channel}")
