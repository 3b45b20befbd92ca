"""What models exist, as the API sees them: each store's catalog in Redis.

A store is a model cache directory (usually one per machine, shared by that machine's
workers) looked after by its pull workers. Each store advertises itself with a heartbeat and
mirrors its manifests into a Redis hash, so API replicas on other machines can answer
/api/tags and /api/show, and decide whether a model can be loaded, without a disk of their
own. A model is "on disk" when some live store lists it.
"""

from __future__ import annotations

import hashlib

from pydantic import BaseModel
from redis.asyncio import Redis

from common import clock, keys
from common.errors import BadRequest
from common.model_info import ModelDescription
from common.models import is_repo_id, name_key
from common.registry import live_records

# A store's catalog outlives the store by this much: a store that comes back within a day
# finds it (and rewrites it anyway), one that is gone for good stops costing memory. Every
# heartbeat of a live store sets it afresh, as does every write of the catalog.
CATALOG_TTL_S = 24 * 3600


class ManifestFile(BaseModel):
    path: str  # relative to the model directory
    size: int
    digest: str  # "sha256:<64 hex>"


class Manifest(BaseModel):
    """One model name on one store: where its files are and what they hold."""

    name: str
    repo: str | None = None  # Hugging Face repo it was pulled from
    commit: str | None = None  # the repo commit pulled (a revision is resolved at pull time)
    gguf: str | None = None  # the file it was made from (a GGUF, or a bundled zip), for imported models
    path: str  # model directory, relative to the store root (what vLLM loads)
    files: list[ManifestFile]
    size: int
    digest: str  # sha256 hex over the files' digests: equal for equal content (and for copies)
    modified_at: float
    description: ModelDescription

    @staticmethod
    def digest_of(files: list[ManifestFile]) -> str:
        text = "\n".join(f"{f.path} {f.digest}" for f in sorted(files, key=lambda f: f.path))
        return hashlib.sha256(text.encode()).hexdigest()


class StoreInfo(BaseModel):
    store_id: str
    host: str
    pid: int
    root: str
    free_bytes: int
    heartbeat_at: float = 0.0
    # Where the store serves its files to other machines (workers/peer_server.py), and the
    # bearer token it asks for. The token is made at the pull worker's start and kept only
    # here and in its memory: whoever can read this record may fetch the store's files, and
    # nobody else. None: a store that serves nothing (an older pull worker, or no port).
    url: str | None = None
    token: str | None = None


class CatalogEntry(BaseModel):
    manifest: Manifest
    stores: list[str]  # live stores holding the model
    # The live stores holding exactly this manifest's files (same digest) and serving them:
    # what another machine may fetch the model from, file by file, any of them for any file.
    # Filled by lookup() only (it carries tokens: never hand it to an HTTP client).
    sources: list[StoreInfo] = []


async def publish_store(redis: Redis, info: StoreInfo, ttl_s: float) -> bool:
    """Refresh the store's record; False if it was not there (the store's first beat, a beat
    missed past the TTL, or a Redis that lost its data): the catalog may be gone too."""
    info.heartbeat_at = clock.now()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(keys.store_record(info.store_id), info.model_dump_json(), px=int(ttl_s * 1000), get=True)
        pipe.zadd(keys.STORES, {info.store_id: int(info.heartbeat_at * 1000)})
        pipe.expire(keys.catalog(info.store_id), CATALOG_TTL_S)
        pipe.expire(keys.blobs(info.store_id), CATALOG_TTL_S)  # its uploaded files (common/blob_catalog.py)
        previous, *_ = await pipe.execute()
    return previous is not None


async def remove_store(redis: Redis, store_id: str) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.delete(keys.store_record(store_id))
        pipe.zrem(keys.STORES, store_id)
        await pipe.execute()


async def live_stores(redis: Redis) -> list[StoreInfo]:
    return [StoreInfo.model_validate_json(r) for r in await live_records(redis, keys.STORES, keys.store_record)]


async def reset(redis: Redis, store_id: str, manifests: list[Manifest]) -> None:
    """Make the Redis catalog equal to what is on the store's disk."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.catalog(store_id))
        if manifests:
            pipe.hset(keys.catalog(store_id), mapping={m.name: m.model_dump_json() for m in manifests})
            pipe.expire(keys.catalog(store_id), CATALOG_TTL_S)
        await pipe.execute()


async def put(redis: Redis, store_id: str, manifest: Manifest) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.catalog(store_id), manifest.name, manifest.model_dump_json())
        pipe.expire(keys.catalog(store_id), CATALOG_TTL_S)
        await pipe.execute()


async def remove(redis: Redis, store_id: str, name: str) -> None:
    await redis.hdel(keys.catalog(store_id), name)


async def entries(redis: Redis) -> dict[str, CatalogEntry]:
    """Every model on some live store; a model on several stores is listed once (under the
    first store's spelling, when stores spell a repo id differently)."""
    stores = await live_stores(redis)
    found: dict[str, CatalogEntry] = {}
    spelt: dict[str, str] = {}  # name_key -> the name listed
    for store in sorted(stores, key=lambda s: s.store_id):
        for name, raw in (await redis.hgetall(keys.catalog(store.store_id))).items():
            name = name.decode() if isinstance(name, bytes) else name
            listed = spelt.setdefault(_key(name), name)
            if listed in found:
                if store.store_id not in found[listed].stores:
                    found[listed].stores.append(store.store_id)
            else:
                found[listed] = CatalogEntry(manifest=Manifest.model_validate_json(raw), stores=[store.store_id])
    return found


def _key(name: str) -> str:
    try:
        return name_key(name)
    except BadRequest:  # not a name this version would accept: matched only as it is
        return name


async def lookup(redis: Redis, name: str) -> CatalogEntry | None:
    """The model ``name`` if some live store holds it. A repo id matches whatever its case
    (the Hub's own rule): ``QWEN/x`` finds ``Qwen/x``, and the entry's manifest carries the
    spelling the store keeps."""
    infos = await live_stores(redis)
    stores = sorted(s.store_id for s in infos)
    if not stores:
        return None
    async with redis.pipeline(transaction=False) as pipe:
        for store_id in stores:
            pipe.hget(keys.catalog(store_id), name)
        found = await pipe.execute()
    if all(raw is None for raw in found) and is_repo_id(name):
        found = await _other_spellings(redis, stores, name)
    holders = [s for s, raw in zip(stores, found) if raw is not None]
    if not holders:
        return None
    manifest = Manifest.model_validate_json(next(r for r in found if r is not None))
    same = {s for s, raw in zip(stores, found)
            if raw is not None and Manifest.model_validate_json(raw).digest == manifest.digest}
    sources = [info for info in sorted(infos, key=lambda i: i.store_id) if info.store_id in same and info.url]
    return CatalogEntry(manifest=manifest, stores=holders, sources=sources)


async def _other_spellings(redis: Redis, stores: list[str], name: str) -> list[bytes | None]:
    """Each store's manifest of ``name`` spelt in another case, or None."""
    key = _key(name)
    async with redis.pipeline(transaction=False) as pipe:
        for store_id in stores:
            pipe.hkeys(keys.catalog(store_id))
        names = await pipe.execute()
    found: list[bytes | None] = []
    for store_id, held in zip(stores, names):
        match = next((n for n in held if _key(n.decode() if isinstance(n, bytes) else n) == key), None)
        found.append(None if match is None else await redis.hget(keys.catalog(store_id), match))
    return found
