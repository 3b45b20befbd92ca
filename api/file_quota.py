"""The total size of stored files (VLLAMA_MAX_FILE_STORAGE_BYTES), counted in Redis.

Files expire on their own (VLLAMA_FILE_TTL_S), so a plain counter raised on upload and lowered
on delete would only grow. Each file's size and expiry time are kept beside the sum; every
reservation first drops the files whose time has passed, so the sum is that of files that
still exist. Pruning, checking and reserving are one Lua script: two uploads arriving together
cannot both see room that only one of them fits in, and a file deleted twice is subtracted once.

Batch output files are reserved with ``force``: a batch's results are never thrown away for
want of room. They count, so uploads are refused until files are deleted or expire.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from common import keys

PRUNE_AT_MOST = 1000  # expired entries dropped per reservation: bounded work in one script

# Drop the entries of files whose expiry time has passed (Redis has dropped the files).
_PRUNE = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[4], 'LIMIT', 0, tonumber(ARGV[7]))
for _, id in ipairs(expired) do
  local size = redis.call('HGET', KEYS[1], id)
  if size then
    redis.call('HDEL', KEYS[1], id)
    redis.call('DECRBY', KEYS[3], size)
  end
  redis.call('ZREM', KEYS[2], id)
end
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
"""

_RESERVE = """
-- KEYS: sizes hash, expiry zset, bytes used
-- ARGV: file id, size, expires at (s), now (s), limit, force ('1' = reserve even past the limit),
--       most expired entries to drop
""" + _PRUNE + """
local size = tonumber(ARGV[2])
if ARGV[6] ~= '1' and used + size > tonumber(ARGV[5]) then return {0, used} end
if redis.call('HSETNX', KEYS[1], ARGV[1], size) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  used = redis.call('INCRBY', KEYS[3], size)
end
return {1, used}
"""

_USED = """
-- KEYS, ARGV: as _RESERVE's (only now and the most entries to drop are read)
""" + _PRUNE + """
return used
"""

_RELEASE = """
-- KEYS: sizes hash, expiry zset, bytes used; ARGV: file id
local size = redis.call('HGET', KEYS[1], ARGV[1])
if not size then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DECRBY', KEYS[3], size)
return 1
"""

_KEYS = (keys.FILE_SIZES, keys.FILE_EXPIRY, keys.FILE_BYTES)


@dataclass(frozen=True)
class Reservation:
    granted: bool
    used: int  # bytes counted after the reservation (or, if refused, before it)


async def reserve(redis: Redis, file_id: str, size: int, expires_at: float, now: float, limit: int,
                  force: bool = False) -> Reservation:
    """Count ``size`` bytes for ``file_id`` if they fit under ``limit`` (always, with ``force``)."""
    granted, used = await redis.eval(_RESERVE, len(_KEYS), *_KEYS, file_id, size, int(expires_at), int(now),
                                     limit, "1" if force else "0", PRUNE_AT_MOST)
    return Reservation(bool(granted), int(used))


async def used_now(redis: Redis, now: float) -> int:
    """Bytes counted now, files past their expiry time dropped first."""
    return int(await redis.eval(_USED, len(_KEYS), *_KEYS, "", 0, 0, int(now), 0, "0", PRUNE_AT_MOST))


async def release(redis: Redis, file_id: str) -> bool:
    """Stop counting ``file_id`` (deleted, or never stored); False if it was not counted."""
    return bool(await redis.eval(_RELEASE, len(_KEYS), *_KEYS, file_id))


def shown(n: int) -> str:
    """Bytes for a person: 1.5 GiB, 200 MiB, 12 KiB, 300 bytes."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"
