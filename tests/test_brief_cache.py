"""api/brief_cache.py: what every request reads is read once for a burst of them."""

from __future__ import annotations

import asyncio

import pytest

from api.brief_cache import BriefCache


class Source:
    def __init__(self) -> None:
        self.reads = 0
        self.release = asyncio.Event()
        self.fail = False

    async def __call__(self, key: str) -> str:
        self.reads += 1
        await self.release.wait()
        if self.fail:
            raise ConnectionError("Redis went away")
        return f"{key} #{self.reads}"


async def test_a_burst_of_misses_reads_once_and_a_fresh_read_reads_again():
    source = Source()
    cache = BriefCache(60.0, source)
    burst = [asyncio.create_task(cache.get("workers")) for _ in range(100)]
    await asyncio.sleep(0)
    source.release.set()
    assert set(await asyncio.gather(*burst)) == {"workers #1"} and source.reads == 1
    assert await cache.get("workers") == "workers #1"  # kept
    assert await cache.get("workers", fresh=True) == "workers #2"
    assert await cache.get("other") == "other #3"  # keys apart


async def test_values_expire():
    source = Source()
    source.release.set()
    cache = BriefCache(0.05, source)
    assert await cache.get("k") == "k #1"
    await asyncio.sleep(0.1)
    assert await cache.get("k") == "k #2"


async def test_a_waiter_cancelled_leaves_the_read_to_the_others_and_a_failure_is_retried():
    source = Source()
    cache = BriefCache(60.0, source)
    first, second = asyncio.create_task(cache.get("k")), asyncio.create_task(cache.get("k"))
    await asyncio.sleep(0)
    first.cancel()
    source.release.set()
    assert await second == "k #1"
    with pytest.raises(asyncio.CancelledError):
        await first

    source.fail = True
    with pytest.raises(ConnectionError):
        await cache.get("k", fresh=True)
    source.fail = False
    assert await cache.get("k", fresh=True) == "k #3"  # nothing stuck after the failure
