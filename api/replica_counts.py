"""The HTTP counters of /metrics across the processes of one `vllama api --workers N`.

Each process counts the requests it answers; a scrape reaches one of them at random, so it
alone would show a fraction that jumps from scrape to scrape. The processes of one command
share a group id (``GROUP_ENV``, set by the command): each writes its counts into the
group's hash in Redis every ``PUBLISH_EVERY_S``, a field per process, and /metrics shows the
group's sum, its own counts live. A process that died keeps its last counts there, so the
sum never goes back. A single-process API has no group and shows its own counts, as before.
Replicas on other machines are other groups: Prometheus scrapes and sums each.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common import keys

log = logging.getLogger(__name__)

GROUP_ENV = "VLLAMA_API_GROUP"
PUBLISH_EVERY_S = 2.0
# The group's hash outlives its last write by this long, then goes with its command.
GROUP_TTL_S = 600


class ReplicaCounts:
    """``requests``: (method, endpoint, status) -> count; ``by_key``: key name -> count."""

    def __init__(self, redis: Redis, process_id: str, requests: Counter, by_key: Counter,
                 group: str | None = None) -> None:
        self._redis = redis
        self._process_id = process_id
        self.requests = requests
        self.by_key = by_key
        self.group = group if group is not None else (os.environ.get(GROUP_ENV) or None)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.group is not None:
            self._task = asyncio.create_task(self._publish_every(), name="replica-counts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.group is not None:
            try:
                await self.publish()  # the last counts, kept for the group's sum
            except (RedisError, OSError):
                pass

    async def publish(self) -> None:
        key = keys.api_http_counts(self.group)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, self._process_id, self._snapshot())
            pipe.expire(key, GROUP_TTL_S)
            await pipe.execute()

    async def totals(self) -> tuple[Counter, Counter]:
        """The group's requests and per-key counts (this process's alone without a group)."""
        if self.group is None:
            return self.requests, self.by_key
        requests, by_key = Counter(self.requests), Counter(self.by_key)
        for process_id, raw in (await self._redis.hgetall(keys.api_http_counts(self.group))).items():
            if (process_id.decode() if isinstance(process_id, bytes) else process_id) == self._process_id:
                continue  # our own, live above
            other = orjson.loads(raw)
            requests.update({(m, e, s): n for m, e, s, n in other["requests"]})
            by_key.update(dict(other["keys"]))
        return requests, by_key

    def _snapshot(self) -> bytes:
        data: dict[str, Any] = {"requests": [[m, e, s, n] for (m, e, s), n in self.requests.items()],
                                "keys": list(self.by_key.items())}
        return orjson.dumps(data)

    async def _publish_every(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_EVERY_S)
            try:
                await self.publish()
            except (RedisError, OSError) as exc:  # Redis away a while: the next round writes them
                log.debug("could not publish this process's HTTP counts: %s", exc)
