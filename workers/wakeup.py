"""Wake-ups: a worker's job consumers take a job the moment it is queued, and honour an abort
the moment it is asked for, instead of polling Redis a hundred times a second.

Every enqueue and abort publishes a small message on one channel (``keys.WAKEUP``; the
format is described there, the publishers are in common/job_queue.py). Each worker process
holds one pub/sub connection for it, here, whatever the number of models and queues it
serves, and tells the consumers concerned: those of the queue named (a poll now), or the one
running the job to abort. Consumers still poll now and then (VLLAMA_POLL_DELAY_S) as a
fallback, so a job is never stranded by a lost message.

What must stay true: a message published while the subscription is away is lost, so every
time it is (re)established, every consumer polls once. The confirmation of a SUBSCRIBE is
that moment: anything published later reaches us, anything queued earlier is in the queue
when the poll reads it.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from common import keys
from common.job_consumer import JobConsumer
from common.subscriptions import next_message
from common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

RETRY_S = 0.5  # between attempts to get the subscription back; consumers poll meanwhile
READ_TIMEOUT_S = 30.0  # a quiet channel costs one wake of this task per this long


class WakeupListener:
    """The worker process's one subscription to ``keys.WAKEUP``, shared by its consumers."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._queues: dict[str, set[JobConsumer]] = {}
        self._task: asyncio.Task | None = None
        self.subscribed = False  # the subscription is confirmed and its connection up
        self.wakeups = 0  # messages received (for tests and benchmarks)

    def add(self, consumer: JobConsumer) -> None:
        self._queues.setdefault(consumer.queue_name, set()).add(consumer)
        consumer.wake()  # whatever was published before it was here

    def remove(self, consumer: JobConsumer) -> None:
        consumers = self._queues.get(consumer.queue_name)
        if consumers is not None:
            consumers.discard(consumer)
            if not consumers:
                del self._queues[consumer.queue_name]

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="wakeups")

    async def stop(self) -> None:
        """Idempotent."""
        await cancel_and_wait(self._task)
        self._task = None
        self.subscribed = False

    def _consumers(self) -> list[JobConsumer]:
        return [c for consumers in self._queues.values() for c in consumers]

    async def _listen(self) -> None:
        pubsub = self._redis.pubsub()
        away_since: float | None = None
        try:
            while True:
                try:
                    if not pubsub.subscribed:  # never confirmed yet; later ones redis-py renews itself
                        await pubsub.subscribe(keys.WAKEUP)
                    message = await next_message(pubsub, READ_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001 - Redis away: consumers poll meanwhile
                    self.subscribed = False
                    if away_since is None:
                        away_since = asyncio.get_running_loop().time()
                        log.warning("wake-up subscription lost (%s); the job consumers poll every "
                                    "VLLAMA_POLL_DELAY_S until it is back", exc)
                    await asyncio.sleep(RETRY_S)
                    continue
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    if away_since is not None:
                        log.info("wake-up subscription back after %.1f s",
                                 asyncio.get_running_loop().time() - away_since)
                        away_since = None
                    self.subscribed = True
                    for consumer in self._consumers():
                        consumer.wake()
                elif message["type"] == "message":
                    self.wakeups += 1
                    self._dispatch(message["data"])
        finally:
            self.subscribed = False
            await asyncio.shield(pubsub.aclose())

    def _dispatch(self, data: bytes | str) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        head, _, rest = text.partition(" ")
        if head == "abort":
            for consumer in self._consumers():
                consumer.abort_requested(rest)
            return
        try:
            score_ms = int(head)
        except ValueError:
            log.warning("ignored a wake-up message of an unknown form: %.80r", text)
            return
        for consumer in self._queues.get(rest, ()):
            consumer.jobs_queued(score_ms)
