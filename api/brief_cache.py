"""What the API reads from Redis for every request (the live workers, a model's description),
kept briefly: the requests of a burst all find the value stale at the same moment, and
without this each would read it again, hundreds of reads of one value at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BriefCache(Generic[K, V]):
    """Values of ``fetch(key)`` kept for ``ttl_s``; the misses of one key at one moment share
    a single fetch."""

    def __init__(self, ttl_s: float, fetch: Callable[[K], Awaitable[V]]) -> None:
        self.ttl_s = ttl_s
        self._fetch = fetch
        self._values: dict[K, tuple[float, V]] = {}
        self._fetching: dict[K, asyncio.Future[V]] = {}

    async def get(self, key: K, fresh: bool = False) -> V:
        """The value, fetched now if it is older than ttl_s; ``fresh``: fetched for this call."""
        if not fresh:
            kept = self._values.get(key)
            if kept is not None and time.monotonic() - kept[0] <= self.ttl_s:
                return kept[1]
            shared = self._fetching.get(key)
            if shared is not None:
                return await asyncio.shield(shared)  # a waiter cancelled leaves the fetch to the others
        fetch = asyncio.ensure_future(self._fetch_into(key))
        if not fresh:
            self._fetching[key] = fetch
            fetch.add_done_callback(partial(self._fetched, key))
        return await asyncio.shield(fetch)

    def _fetched(self, key: K, fetch: asyncio.Future[V]) -> None:
        if self._fetching.get(key) is fetch:
            del self._fetching[key]

    async def _fetch_into(self, key: K) -> V:
        started = time.monotonic()
        value = await self._fetch(key)
        self._values[key] = (started, value)
        return value
