"""Redis connections and arq's JSON serializer.

arq pickles by default; a pickle read from a shared Redis runs code, so both the API's pool
and every worker use these JSON functions instead (redis-cli then shows readable jobs).
"""

from __future__ import annotations

import json
from typing import Any

from arq.connections import ArqRedis, RedisSettings


def _json_default(obj: Any) -> Any:
    # arq stores a failed job's exception as its result; keep the type and message readable.
    if isinstance(obj, BaseException):
        return {"error_type": type(obj).__name__, "error": str(obj)}
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def job_serializer(obj: Any) -> bytes:
    return json.dumps(obj, default=_json_default, separators=(",", ":")).encode()


def job_deserializer(data: bytes) -> Any:
    return json.loads(data)


def redis_settings(url: str) -> RedisSettings:
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = 2
    return settings


async def connect(url: str) -> ArqRedis:
    """An ArqRedis (a redis.asyncio.Redis) using the JSON serializer."""
    from arq.connections import create_pool

    return await create_pool(
        redis_settings(url), job_serializer=job_serializer, job_deserializer=job_deserializer
    )
