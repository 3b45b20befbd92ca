"""Disk space for pulls: a pull reserves what it will write before it writes it.

Free space alone is not enough: two pulls that each fit, started together, both see the same
free bytes and fill the disk between them. So a pull reserves the bytes it still has to write
in ``vllama:disk:<store>`` (common/keys.py), a Redis hash shared by every pull worker writing to
that store's directory (processes on one machine, or machines sharing one disk under one
VLLAMA_STORE_ID), and the check counts the others' reservations against the free bytes. The
check and the reservation are one Lua script, so no two pulls can both pass on the same bytes.

What must stay true:
- A reservation is released when its pull ends, done or failed (``release`` in a ``finally``).
- A pull worker that dies cannot hold space for ever: each reservation carries an expiry (Redis's
  clock), renewed with the bytes still to write at every heartbeat of its pull, and every
  check drops the lapsed ones first.
- Bytes already written are on the disk, not in the reservation: renewing lowers it as the
  download advances, so a long pull does not count twice what it has written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Protocol

from redis.asyncio import Redis

from common import keys
from common.errors import InsufficientStorage, Unavailable

# A reservation outlives its pull worker by at most this long. Renewed every heartbeat (about
# a second), so a stall of the worker's event loop shorter than this never drops it.
RESERVATION_TTL_S = 60.0
RESERVE_TIMEOUT_S = 60.0  # a pull worker whose loop is gone must not hold its download thread for ever

# KEYS[1]: the store's hash. ARGV: id, bytes, free bytes, ttl ms.
# Drops lapsed reservations, then reserves if bytes + the others' fit in free; returns
# {1 if reserved else 0, bytes held by the others}.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local held = 0
for i = 1, #all, 2 do
  local bytes, expires = string.match(all[i + 1], '^(%d+) (%d+)$')
  if bytes == nil or tonumber(expires) <= now then
    redis.call('HDEL', KEYS[1], all[i])
  elseif all[i] ~= ARGV[1] then
    held = held + tonumber(bytes)
  end
end
if tonumber(ARGV[2]) + held > tonumber(ARGV[3]) then
  return {0, tostring(held)}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. string.format('%.0f', now + tonumber(ARGV[4])))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, tostring(held)}
"""

# KEYS[1]: the store's hash. ARGV: id, bytes, ttl ms. Only a reservation still there is renewed.
_RENEW = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. string.format('%.0f', now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


def size_text(n: int | float) -> str:
    """Bytes for people: 25.2 MB, 16.1 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def not_enough(name: str, needed: int, free: int, held: int = 0, verb: str = "pull") -> InsufficientStorage:
    """``verb``: what was being done, and what to do again (pull, upload)."""
    others = f", and {size_text(held)} of that is held by other pulls under way" if held else ""
    return InsufficientStorage(
        f"not enough disk space to {verb} {name}: it needs {size_text(needed)} more, {size_text(free)} "
        f"are free in the model store{others}; delete models you no longer need (ollama rm NAME), "
        f"or set VLLAMA_HOME to a bigger disk, then {verb} again"
    )


class DiskReservations:
    """The reservations of one store, in Redis."""

    def __init__(self, redis: Redis, store_id: str, ttl_s: float = RESERVATION_TTL_S) -> None:
        self.key = keys.disk_reservations(store_id)
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._reserve = redis.register_script(_RESERVE)
        self._renew = redis.register_script(_RENEW)
        self._redis = redis

    async def reserve(self, reservation: str, name: str, needed: int, free: int, verb: str = "pull") -> None:
        """Hold ``needed`` bytes for ``reservation``, or raise InsufficientStorage (507) saying
        what is needed and what is free."""
        ok, held = await self._reserve(keys=[self.key], args=[reservation, max(0, int(needed)), int(free), self._ttl_ms])
        if not int(ok):
            raise not_enough(name, needed, free, int(held), verb)

    async def renew(self, reservation: str, remaining: int) -> None:
        await self._renew(keys=[self.key], args=[reservation, max(0, int(remaining)), self._ttl_ms])

    async def release(self, reservation: str) -> None:
        await self._redis.hdel(self.key, reservation)

    async def held(self) -> dict[str, int]:
        """Bytes per reservation (lapsed ones included until the next check drops them)."""
        raw = await self._redis.hgetall(self.key)
        return {(k.decode() if isinstance(k, bytes) else k): int(v.split()[0]) for k, v in raw.items()}


class Space(Protocol):
    """What a pull calls, from its thread, before writing ``needed`` bytes into the store."""

    def reserve(self, name: str, needed: int) -> None: ...


class FreeSpace:
    """The plain check, for writers that hold no Redis connection: free bytes now."""

    def __init__(self, free_bytes) -> None:
        self._free_bytes = free_bytes

    def reserve(self, name: str, needed: int) -> None:
        free = self._free_bytes()
        if needed > free:
            raise not_enough(name, needed, free)


class ReservedSpace:
    """A pull's reservation, made from its download thread through the pull worker's loop."""

    def __init__(self, reservations: DiskReservations, reservation: str, free_bytes,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.reservations = reservations
        self.reservation = reservation
        self._free_bytes = free_bytes
        self._loop = loop

    def reserve(self, name: str, needed: int) -> None:
        free = self._free_bytes()
        future = asyncio.run_coroutine_threadsafe(
            self.reservations.reserve(self.reservation, name, needed, free), self._loop)
        try:
            future.result(timeout=RESERVE_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise Unavailable(f"could not reserve disk space for {name}: Redis did not answer within "
                              f"{RESERVE_TIMEOUT_S:.0f} s; pull again") from None
