"""Cluster time: this machine's wall clock, corrected to Redis's.

Times that cross processes (when a job was created or started, a heartbeat, a load request,
when a model expires) are compared by other machines, whose clocks may be minutes off. Every
process therefore stamps them with ``now()``, its own clock plus the offset to the clock of
the Redis server they all share, measured with Redis's TIME (half a round trip either way).
Durations measured inside one process keep using ``time.monotonic()``; liveness uses key
TTLs, which Redis alone judges.
"""

from __future__ import annotations

import math
import time
from typing import Any

# Seconds to add to this machine's clock to read Redis's, and the round trip of the
# measurement it came from. A float is replaced atomically, so the heartbeat thread may update
# it while the event loop reads it.
_offset = 0.0
_offset_rtt = math.inf

RESYNC_S = 10.0  # how often long-running processes measure it again
SAMPLES = 3  # TIME calls per measurement; the quickest round trip is the most precise
# The error of a measurement is at most half its round trip. On a starved machine (a busy
# event loop, a thread waiting for the interpreter lock) one can take seconds, so a slow
# measurement replaces the offset only if the one it came from was slower still. Each slow
# one turned away doubles what the held offset is credited with, so a clock that really
# moved is followed after a few rounds even where every round trip is slow.
TRUSTED_RTT_S = 0.1


def now() -> float:
    """Seconds since the epoch by Redis's clock."""
    return time.time() + _offset


def now_ms() -> int:
    return int(now() * 1000)


def _settle(samples: list[tuple[float, Any, float]]) -> float:
    """Keep the offset from the sample with the shortest round trip, unless the offset in use
    came from a quicker one and this one is too slow to trust."""
    global _offset, _offset_rtt
    before, reply, after = min(samples, key=lambda s: s[2] - s[0])
    rtt = after - before
    if rtt > TRUSTED_RTT_S and rtt > _offset_rtt:
        _offset_rtt *= 2
        return _offset
    seconds, micros = (int(x) for x in reply)
    _offset, _offset_rtt = seconds + micros / 1e6 - (before + after) / 2, rtt
    return _offset


async def sync(redis: Any) -> float:
    """Measure the offset to ``redis``'s clock (an asyncio client); returns it."""
    samples = []
    for _ in range(SAMPLES):
        before = time.time()
        reply = await redis.time()
        samples.append((before, reply, time.time()))
    return _settle(samples)


def sync_blocking(client: Any) -> float:
    """The same, for a synchronous client (the heartbeat thread)."""
    samples = []
    for _ in range(SAMPLES):
        before = time.time()
        reply = client.time()
        samples.append((before, reply, time.time()))
    return _settle(samples)
