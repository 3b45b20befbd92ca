"""One pub/sub connection per API process, shared by every request in flight.

A Redis connection per streaming request would exhaust connections under load; instead a
single reader task receives every frame and hands it to each subscription of its channel.

Streamed jobs answer on the process's own reply channel (``vllama:replies:<api id>``):
workers send each engine step's frames for all of this process's jobs as one bundle,
``{"<job id>": [frame, ...], ...}``, which the reader splits among the jobs' inboxes
(``inbox``). That is one message per worker and step instead of one per token. Frames for a
job that has no inbox here (its client left, and the abort sent then was lost) get the job
aborted again (``on_orphan``), so its worker stops generating for nobody.

Other channels carry one frame per message: an async job's (``vllama:frames:<id>``), which
any number of readers may follow (two clients attached to one async job's stream), each with
its own subscription and every frame, in order; and a pull's progress. The Redis
subscription is taken by the first reader and dropped with the last. ``subscribe`` and
``inbox`` return only once Redis has confirmed the subscription, so a job enqueued after it
cannot publish into the void.

A reader that does not keep up (a client that stopped reading its response) cannot grow
the process's memory without bound: past ``MAX_BACKLOG`` unread frames its subscription is
marked overflowed and takes no more; the reader learns so on its next read and either
catches up from the frames kept in Redis (async jobs) or ends the client's stream with an
error.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from common import keys
from common.errors import StreamBroken
from common.keys import PREFIX
from common.subscriptions import next_message
from common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Kept subscribed so the shared connection always has a subscription (a PubSub with none
# refuses get_message) and exists before the first request.
CONTROL_CHANNEL = f"{PREFIX}:control"
SUBSCRIBE_TIMEOUT_S = 5.0
# Unread frames one subscription may hold: tens of seconds of a fast stream, a few MB.
MAX_BACKLOG = 20_000
# Orphaned job ids remembered, so each is aborted once, not once per step.
ORPHANS_KEPT = 10_000


class Overflowed(StreamBroken):
    """The reader fell more than MAX_BACKLOG frames behind; later frames were dropped."""

    def __init__(self) -> None:
        super().__init__("the client read the answer too slowly and fell too far behind; retry the request "
                         "and read the stream as it comes")


class Subscription:
    """One reader's view of a channel (or of one job on the reply channel): its own queue of
    frames, raw JSON (bytes) from a channel of its own, parsed objects (dicts) from a bundle."""

    def __init__(self, channel: str, limit: int, timeouts: Timeouts, job_id: str | None = None) -> None:
        self.channel = channel
        self.job_id = job_id  # set for a job's inbox on the reply channel
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._limit = limit
        self._timeouts = timeouts
        self.overflowed = False

    def _deliver(self, items: list[Any]) -> None:
        if self.overflowed:
            return
        if len(self._items) + len(items) > self._limit:
            self.overflowed = True
            self._items.clear()  # free the backlog now; the reader is told on its next read
        else:
            self._items.extend(items)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def take_all(self) -> list[Any]:
        """Every frame waiting (none: an empty list); Overflowed if frames were dropped."""
        if self.overflowed:
            raise Overflowed()
        items = list(self._items)
        self._items.clear()
        return items

    async def wait(self, timeout_s: float) -> bool:
        """Until a frame waits (True) or ``timeout_s`` passed without one (False)."""
        if self._items or self.overflowed:
            return True
        self._waiter = asyncio.get_running_loop().create_future()
        self._timeouts.add(self, timeout_s)
        try:
            await self._waiter
        finally:
            self._timeouts.remove(self)
            self._waiter = None
        return bool(self._items) or self.overflowed

    async def get(self, timeout_s: float) -> Any | None:
        """The next frame, or None after ``timeout_s`` without one; Overflowed if frames were dropped."""
        if not await self.wait(timeout_s):
            return None
        if self.overflowed:
            raise Overflowed()
        return self._items.popleft()


class Timeouts:
    """The timeouts of every waiting subscription, on one timer that ticks while any waits.

    Hundreds of streams each wait for their next frame every engine step; a timer of its
    own for each wait (made, then cancelled as the frame comes) cost more than the rest of
    the wait. The timeouts are the quiet-stream checks of a watchdog, for which a tenth of a
    second either way is nothing."""

    TICK_S = 0.1

    def __init__(self) -> None:
        self._deadlines: dict[Subscription, float] = {}
        self._task: asyncio.Task | None = None

    def add(self, subscription: Subscription, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._deadlines[subscription] = loop.time() + timeout_s
        if self._task is None:
            self._task = loop.create_task(self._tick(), name="subscription-timeouts")

    def remove(self, subscription: Subscription) -> None:
        self._deadlines.pop(subscription, None)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._deadlines:
                await asyncio.sleep(self.TICK_S)
                now = loop.time()
                for subscription, deadline in list(self._deadlines.items()):
                    if now >= deadline:
                        subscription._wake()
        finally:
            self._task = None


@dataclass
class _Channel:
    subscriptions: set[Subscription] = field(default_factory=set)
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)
    # SUBSCRIBE commands sent whose confirmation has not arrived: a confirmation left over
    # from an earlier subscribe/unsubscribe of the same channel must not confirm this one.
    pending: int = 0


class FrameMultiplexer:
    def __init__(self, redis: Redis, max_backlog: int | None = None,
                 on_orphan: Callable[[str], Any] | None = None) -> None:
        self._pubsub = redis.pubsub()
        self._channels: dict[str, _Channel] = {}
        self._stale_confirmations: dict[str, int] = {}
        self._dropping: set[str] = set()
        self._max_backlog = max_backlog or MAX_BACKLOG
        self._reader: asyncio.Task | None = None
        self.api_id = uuid.uuid4().hex[:12]
        self.reply_channel = keys.reply_channel(self.api_id)
        self._reply = _Channel(pending=1)
        self._timeouts = Timeouts()
        self._inboxes: dict[str, Subscription] = {}  # job id -> its inbox on the reply channel
        self.on_orphan = on_orphan
        self._orphans: set[str] = set()

    async def start(self) -> None:
        await self._pubsub.subscribe(CONTROL_CHANNEL, self.reply_channel)
        self._reader = asyncio.create_task(self._read(), name="frame-multiplexer")

    async def inbox(self, job_id: str) -> Subscription:
        """A streamed job's frames from the reply channel; hand ``reply_channel`` to its worker."""
        subscription = self._inboxes[job_id] = Subscription(self.reply_channel, self._max_backlog, self._timeouts,
                                                            job_id)
        try:
            await asyncio.wait_for(asyncio.shield(self._reply.confirmed.wait()), SUBSCRIBE_TIMEOUT_S)
        except BaseException:
            del self._inboxes[job_id]
            raise
        return subscription

    async def stop(self) -> None:
        await cancel_and_wait(self._reader)
        self._reader = None
        await self._timeouts.stop()
        await self._pubsub.aclose()

    @property
    def active(self) -> int:
        return sum(len(c.subscriptions) for c in self._channels.values()) + len(self._inboxes)

    async def subscribe(self, channel: str) -> Subscription:
        subscription = Subscription(channel, self._max_backlog, self._timeouts)
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
        if subscription.job_id is not None:
            if self._inboxes.get(subscription.job_id) is subscription:
                del self._inboxes[subscription.job_id]
            return
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
                message = await next_message(self._pubsub, 1.0)
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
                if channel == self.reply_channel:
                    self._deliver_bundle(message["data"])
                    continue
                state = self._channels.get(channel)
                if state is None:
                    self._drop(channel)
                    continue
                for subscription in state.subscriptions:
                    subscription._deliver([message["data"]])
            elif kind == "subscribe" and not self._confirm(channel):
                self._drop(channel)

    def _deliver_bundle(self, data: bytes) -> None:
        try:
            jobs = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.error("a message on %s is not a bundle of frames; ignored", self.reply_channel)
            return
        for job_id, frames in jobs.items():
            inbox = self._inboxes.get(job_id)
            if inbox is not None:
                inbox._deliver(frames)
            elif job_id not in self._orphans and self.on_orphan is not None:
                if len(self._orphans) >= ORPHANS_KEPT:
                    self._orphans.clear()
                self._orphans.add(job_id)
                self.on_orphan(job_id)

    def _confirm(self, channel: str) -> bool:
        """A subscription confirmed; False if nobody here wants the channel."""
        stale = self._stale_confirmations.get(channel, 0)
        if stale:
            if stale == 1:
                del self._stale_confirmations[channel]
            else:
                self._stale_confirmations[channel] = stale - 1
            return True
        state = self._reply if channel == self.reply_channel else self._channels.get(channel)
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
        if channel in (CONTROL_CHANNEL, self.reply_channel) or channel in self._dropping:
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
