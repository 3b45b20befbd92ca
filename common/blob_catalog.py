"""Which live store holds which blob, as every API replica and store reads it from Redis.

A blob is a file uploaded with ``POST /api/blobs/sha256:<hex>`` (Ollama's API), kept on one
store's disk (workers/blobs.py) until a model is made from it. Each store mirrors the blobs on
its disk into ``vllama:blobs:<store>`` (common/keys.py) the way it mirrors its manifests into
its catalog: rewritten whole when it starts or finds Redis emptied, edited on every upload,
fetch and cleanup. Readers count only the stores alive now, so a blob on a machine that went
away is "not found" rather than promised.
"""

from __future__ import annotations

import json
import re

from redis.asyncio import Redis

from common import keys
from common.catalog import CATALOG_TTL_S, StoreInfo, live_stores
from common.errors import BadRequest

# Where a store's file server takes and gives blobs (workers/peer_server.py): the API uploads
# to it, other stores fetch from it.
BLOB_ROUTE = "/v1/blob/{sha}"


def blob_route(sha: str) -> str:
    return BLOB_ROUTE.format(sha=sha)


# Ollama accepts both separators; the colon is what clients send, the dash what its files are named.
_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")


def parse_digest(text: str) -> str:
    """The lowercase sha256 hex of ``sha256:<64 hex>``; BadRequest (Ollama's 400) if it is not one."""
    match = _DIGEST.fullmatch(text or "")
    if match is None:
        raise BadRequest(f'invalid digest format: "{text[:100]}" is not "sha256:" followed by 64 hex digits')
    return match.group(1).lower()


async def reset(redis: Redis, store_id: str, blobs: dict[str, int]) -> None:
    """Make the store's record equal to the blobs on its disk (hex -> size)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.blobs(store_id))
        if blobs:
            pipe.hset(keys.blobs(store_id), mapping={h: json.dumps({"size": n}) for h, n in blobs.items()})
            pipe.expire(keys.blobs(store_id), CATALOG_TTL_S)
        await pipe.execute()


async def put(redis: Redis, store_id: str, sha: str, size: int) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.blobs(store_id), sha, json.dumps({"size": size}))
        pipe.expire(keys.blobs(store_id), CATALOG_TTL_S)
        await pipe.execute()


async def remove(redis: Redis, store_id: str, shas: list[str]) -> None:
    if shas:
        await redis.hdel(keys.blobs(store_id), *shas)


async def holders(redis: Redis, shas: list[str]) -> dict[str, list[tuple[StoreInfo, int]]]:
    """For each blob, the live stores holding it and its size there (none: an empty list)."""
    stores = sorted(await live_stores(redis), key=lambda s: s.store_id)
    found: dict[str, list[tuple[StoreInfo, int]]] = {sha: [] for sha in shas}
    if not stores or not shas:
        return found
    async with redis.pipeline(transaction=False) as pipe:
        for store in stores:
            pipe.hmget(keys.blobs(store.store_id), shas)
        rows = await pipe.execute()
    for store, row in zip(stores, rows):
        for sha, raw in zip(shas, row):
            if raw is not None:
                found[sha].append((store, int(json.loads(raw)["size"])))
    return found
