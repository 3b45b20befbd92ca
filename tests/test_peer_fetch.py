"""Models made on one machine reach the others: two (or three) stores with their own homes and
ids in this process, each a real pull worker with its real file server, real Redis and real
HTTP. A model written on host A (tests/model_factory.py) is fetched by host B's worker path
(``ensure_local``) and by ``/api/pull``, and checked byte for byte and digest for digest."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest

from common import catalog
from common.catalog import Manifest, ManifestFile
from common.errors import ModelNotFound, Unavailable, Upstream, VllamaError
from common.models import canonical_name
from common.protocol import PullState
from common.redis_conn import connect
from common.settings import Settings
from tests.fake_stack import fake_stack
from tests.harness import async_wait_until, ndjson_lines
from tests.model_factory import write_model
from workers.peer_fetch import fetch_from_peers
from workers.peer_server import FILE_ROUTE, StoreServer, _bind
from workers.pull import Progress, ensure_local
from workers.pull_worker import PullWorker
from workers.store import ModelStore, describe_files

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "made-here:1b"
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
WAIT_S = 60  # a busy 2-core machine: heartbeats and resyncs may lag


# ---------------------------------------------------------------- helpers


@asynccontextmanager
async def running_store(redis_url: str, home: Path, store_id: str, **overrides):
    """A pull worker of its own store, serving its files on a free port, until the block ends."""
    settings = Settings(redis_url=redis_url, home=home, store_id=store_id, store_port=0,
                        heartbeat_interval_s=0.25, heartbeat_ttl_s=3.0, **overrides)
    worker = PullWorker(settings)
    task = asyncio.create_task(worker.run(redis=await connect(redis_url)))
    redis = await connect(redis_url)
    try:
        async def live() -> bool:
            if task.done():
                task.result()
            return any(s.store_id == store_id and s.url for s in await catalog.live_stores(redis))

        await async_wait_until(live, WAIT_S, f"store {store_id} to be live")
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, WAIT_S)
        await redis.aclose()


@asynccontextmanager
async def stores(redis_server, tmp_path: Path, *ids: str):
    """Stores ``ids`` on an empty Redis, homes under ``tmp_path/<id>``; yields them and a client."""
    redis = await connect(redis_server.url)
    await redis.flushdb()
    async with AsyncExitStack() as stack:
        started = [await stack.enter_async_context(running_store(redis_server.url, tmp_path / i, i)) for i in ids]
        try:
            yield redis, *started
        finally:
            await redis.aclose()


def make_model(home: Path, name: str = MODEL) -> Manifest:
    """A small real model (config, safetensors, template, and a file in a subdirectory, as
    sentence-transformers models have), made on this "host" only: no Hub repo."""
    manifest = write_model(home, name, chat_template=TEMPLATE)
    store = ModelStore(home / "models")
    directory = store.model_dir(manifest)
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 8}))
    files = describe_files(directory)
    manifest = manifest.model_copy(update={"files": files, "size": sum(f.size for f in files),
                                           "digest": Manifest.digest_of(files)})
    store.save(manifest)
    return manifest


async def listed(redis, name: str, *store_ids: str) -> catalog.CatalogEntry:
    """The catalog entry once every store in ``store_ids`` lists ``name`` and serves it."""
    async def ready():
        entry = await catalog.lookup(redis, name)
        if entry is not None and set(store_ids) <= {s.store_id for s in entry.sources}:
            return entry
        return None

    return await async_wait_until(ready, WAIT_S, f"{name} listed by {store_ids}")


def files_of(store: ModelStore, name: str) -> dict[str, bytes]:
    directory = store.model_dir(store.get(name))
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(store: ModelStore) -> list[str]:
    """What a failed fetch may have left in the store: model directories or manifests."""
    found = [p.name for p in store.local.iterdir()] if store.local.exists() else []
    return found + ([p.name for p in store.manifests.iterdir()] if store.manifests.exists() else [])


def tamper(store: ModelStore, name: str, path: str = "model.safetensors") -> None:
    """Change bytes of a file after its manifest was written, keeping its size."""
    target = store.model_dir(store.get(name)) / path
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))


# ---------------------------------------------------------------- the server


async def test_store_files_need_the_token_and_only_listed_files_are_served(redis_server, tmp_path):
    async with stores(redis_server, tmp_path, "host-a") as (redis, a):
        manifest = make_model(a.store.root.parent)
        directory = a.store.model_dir(manifest)
        (directory / "secret.txt").write_text("not listed")
        outside = tmp_path / "outside.txt"  # next to the store, not in it
        outside.write_text("outside the store")
        # A manifest (written by hand) that lists files out of the store: listed, yet refused.
        other = write_model(a.store.root.parent, "other:1b")
        (a.store.model_dir(other) / "link.json").symlink_to(outside)
        assert (a.store.model_dir(other) / "../../../../outside.txt").resolve() == outside
        a.store.save(other.model_copy(update={"files": [*other.files, ManifestFile(
            path="../../../../outside.txt", size=1, digest="sha256:" + "0" * 64), ManifestFile(
            path="link.json", size=1, digest="sha256:" + "0" * 64)]}))
        entry = await listed(redis, MODEL, "host-a")
        [info] = entry.sources
        assert info.url.startswith("http://127.0.0.1:"), "advertised: the local address of the Redis connection"
        assert info.token and len(info.token) >= 32
        url = info.url + FILE_ROUTE
        auth = {"Authorization": f"Bearer {info.token}"}

        async with httpx.AsyncClient(timeout=30) as http:
            good = {"model": MODEL, "path": "model.safetensors"}
            r = await http.get(url, params=good, headers=auth)
            assert r.status_code == 200 and r.content == (directory / "model.safetensors").read_bytes()
            r = await http.get(url, params={"model": MODEL, "path": "1_Pooling/config.json"}, headers=auth)
            assert r.status_code == 200 and json.loads(r.content) == {"word_embedding_dimension": 8}

            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": info.token},
                            {"Authorization": f"Basic {info.token}"}):
                r = await http.get(url, params=good, headers=headers)
                assert r.status_code == 401, (headers, r.text)

            refused = [
                {"model": MODEL, "path": "secret.txt"},  # in the directory, not in the manifest
                {"model": MODEL, "path": "../../manifests/made-here%3A1b.json"},
                {"model": MODEL, "path": str(outside)},
                {"model": MODEL, "path": "./config.json"},
                {"model": MODEL, "path": "1_Pooling/../config.json"},
                {"model": "../../../..", "path": "outside.txt"},
                {"model": "other:1b", "path": "../../../../outside.txt"},  # listed, outside the store
                {"model": "other:1b", "path": "link.json"},  # listed, a symlink out of the store
                {"model": "missing:1b", "path": "config.json"},
                {"model": MODEL, "path": ""},
                {"path": "config.json"},
            ]
            for params in refused:
                r = await http.get(url, params=params, headers=auth)
                assert r.status_code == 404, (params, r.status_code, r.text)
                assert b"outside the store" not in r.content and b"not listed" not in r.content


async def test_the_default_port_gives_way_and_a_chosen_one_does_not(redis_server, tmp_path):
    redis = await connect(redis_server.url)
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        # Not chosen by the operator (the default): another free port, advertised in Redis.
        fallback = _bind("127.0.0.1", port, explicit=False)
        assert fallback.getsockname()[1] not in (0, port)
        fallback.close()
        # Chosen (VLLAMA_STORE_PORT): the pull worker stops at start, naming the variable.
        chosen = Settings(redis_url=redis_server.url, home=tmp_path, store_port=port, store_id="host-x")
        with pytest.raises(VllamaError, match=f"VLLAMA_STORE_PORT={port}"):
            await asyncio.wait_for(PullWorker(chosen).run(redis=await connect(redis_server.url)), WAIT_S)
        assert "host-x" not in {s.store_id for s in await catalog.live_stores(redis)}
        # An operator's advertised address is used as given.
        advertised = Settings(redis_url=redis_server.url, home=tmp_path, store_port=0,
                              store_bind="127.0.0.1", store_advertise="models-a.example:8123")
        server = StoreServer(ModelStore(tmp_path / "models"))
        try:
            assert await server.start(advertised, redis) == "http://models-a.example:8123"
        finally:
            await server.stop()
    finally:
        taken.close()
        await redis.aclose()


# ---------------------------------------------------------------- fetching


async def test_a_worker_on_another_host_fetches_the_model_from_the_store_that_made_it(redis_server, tmp_path):
    async with stores(redis_server, tmp_path, "host-a", "host-b") as (redis, a, b):
        made = make_model(a.store.root.parent)
        entry = await listed(redis, MODEL, "host-a")
        assert entry.manifest.repo is None and entry.stores == ["host-a"]

        path = await asyncio.to_thread(ensure_local, b.store, MODEL, entry)
        fetched = b.store.get(MODEL)
        assert fetched is not None and fetched.digest == made.digest and fetched.files == made.files
        assert path == b.store.model_dir(fetched) and path.is_relative_to(b.store.root)
        assert files_of(b.store, MODEL) == files_of(a.store, MODEL)
        assert {f.path: f.digest for f in describe_files(path)} == {f.path: f.digest for f in made.files}
        assert not [p for p in b.store.local.iterdir() if p.name.endswith(".partial")]

        # B now lists it too, and serves it in turn; a second load fetches nothing.
        entry = await listed(redis, MODEL, "host-a", "host-b")
        assert entry.stores == ["host-a", "host-b"]
        inode = (path / "model.safetensors").stat().st_ino
        assert await asyncio.to_thread(ensure_local, b.store, MODEL, entry) == path
        assert (path / "model.safetensors").stat().st_ino == inode


async def test_pull_onto_a_store_that_lacks_it_fetches_from_a_peer(redis_server, tmp_path):
    async with stores(redis_server, tmp_path, "host-a", "host-b") as (redis, a, b), \
            fake_stack(redis_server.url, worker=False, flush=False) as api, api.client() as http:
        made = make_model(a.store.root.parent)
        await listed(redis, MODEL, "host-a")

        r = await http.post("/api/pull", json={"model": MODEL}, timeout=120)
        assert r.status_code == 200, r.text
        lines = ndjson_lines(r.text)
        statuses = [line.get("status") for line in lines]
        assert "error" not in r.text, lines
        assert statuses[0] == "pulling manifest"
        assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
        last = {line["digest"]: line for line in lines if "digest" in line}
        assert set(last) == {f.digest for f in made.files}
        for f in made.files:
            assert last[f.digest]["total"] == f.size and last[f.digest]["completed"] == f.size
            assert last[f.digest]["status"] == f"pulling {f.digest[7:19]}"
        assert files_of(b.store, MODEL) == files_of(a.store, MODEL)
        assert b.store.get(MODEL).digest == made.digest

        # Both stores list it; pulling again fetches nothing ("stream": false answers once).
        tags = {m["name"]: m for m in (await http.get("/api/tags")).json()["models"]}
        assert tags[MODEL]["digest"] == made.digest
        await listed(redis, MODEL, "host-a", "host-b")
        weights = b.store.model_dir(b.store.get(MODEL)) / "model.safetensors"
        inode = weights.stat().st_ino
        r = await http.post("/api/pull", json={"model": MODEL, "stream": False}, timeout=120)
        assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
        assert weights.stat().st_ino == inode


async def test_a_file_changed_after_its_manifest_fails_clearly_and_nothing_is_kept(redis_server, tmp_path):
    async with stores(redis_server, tmp_path, "host-a", "host-b") as (redis, a, b), \
            fake_stack(redis_server.url, worker=False, flush=False) as api, api.client() as http:
        make_model(a.store.root.parent)
        entry = await listed(redis, MODEL, "host-a")
        tamper(a.store, MODEL)

        with pytest.raises(Upstream) as caught:
            await asyncio.to_thread(ensure_local, b.store, MODEL, entry)
        message = caught.value.message
        assert "model.safetensors does not match its manifest" in message and "host-a" in message
        assert "kept nothing" in message and "make the model there again" in message
        assert b.store.get(MODEL) is None and leftovers(b.store) == []

        r = await http.post("/api/pull", json={"model": MODEL}, timeout=120)
        lines = ndjson_lines(r.text)
        assert "model.safetensors does not match its manifest" in lines[-1]["error"], lines
        r = await http.post("/api/pull", json={"model": MODEL, "stream": False}, timeout=120)
        assert r.status_code == 502 and "does not match" in r.json()["error"]
        assert b.store.get(MODEL) is None and leftovers(b.store) == []
        assert (await catalog.lookup(redis, MODEL)).stores == ["host-a"]

        # A file grown on A is cut off at the manifest's size, and fails the same way.
        weights = a.store.model_dir(a.store.get(MODEL)) / "config.json"
        weights.write_bytes(weights.read_bytes() + b" " * 4096)
        with pytest.raises(Upstream, match="config.json has more bytes there than"):
            await asyncio.to_thread(ensure_local, b.store, MODEL, entry)
        assert leftovers(b.store) == []


async def test_another_holder_is_tried_when_one_gives_bad_bytes(redis_server, tmp_path, caplog):
    async with stores(redis_server, tmp_path, "host-a", "host-b", "host-c") as (redis, a, b, c):
        made = make_model(a.store.root.parent)
        assert make_model(c.store.root.parent).digest == made.digest  # the same model, made twice
        entry = await listed(redis, MODEL, "host-a", "host-c")
        assert [s.store_id for s in entry.sources] == ["host-a", "host-c"]
        tamper(a.store, MODEL)

        with caplog.at_level(logging.WARNING, logger="workers.peer_fetch"):
            path = await asyncio.to_thread(ensure_local, b.store, MODEL, entry)
        assert any("host-a" in r.getMessage() and "does not match" in r.getMessage() for r in caplog.records)
        assert files_of(b.store, MODEL) == files_of(c.store, MODEL) != files_of(a.store, MODEL)
        assert {f.path: f.digest for f in describe_files(path)} == {f.path: f.digest for f in made.files}


async def test_without_a_live_holder_the_fetch_fails_clearly(redis_server, tmp_path):
    redis = await connect(redis_server.url)
    await redis.flushdb()
    try:
        async with running_store(redis_server.url, tmp_path / "host-b", "host-b") as b:
            async with running_store(redis_server.url, tmp_path / "host-a", "host-a") as a:
                make_model(a.store.root.parent)
                entry = await listed(redis, MODEL, "host-a")
            # A has stopped: nothing holds the model any more.
            assert await catalog.lookup(redis, MODEL) is None
            with pytest.raises(ModelNotFound):
                await asyncio.to_thread(ensure_local, b.store, MODEL, None)
            # A worker that looked the model up just before A went away.
            with pytest.raises(Upstream) as caught:
                await asyncio.to_thread(ensure_local, b.store, MODEL, entry)
            assert "store host-a: it did not answer" in caught.value.message
            assert "is its pull worker running" in caught.value.message
            assert b.store.get(MODEL) is None and leftovers(b.store) == []
            # Holders that serve nothing (an older pull worker) are named, with what to do.
            silent = entry.model_copy(update={"sources": []})
            with pytest.raises(Unavailable, match="none of them serves its files"):
                await asyncio.to_thread(ensure_local, b.store, MODEL, silent)
    finally:
        await redis.aclose()


async def test_a_manifest_that_climbs_out_of_its_directory_writes_nothing(tmp_path):
    store = ModelStore(tmp_path / "models")
    evil = ManifestFile(path="../../outside.txt", size=3, digest="sha256:" + "1" * 64)
    manifest = Manifest(name=canonical_name("evil:1b"), path="local/x", files=[evil], size=3,
                        digest=Manifest.digest_of([evil]), modified_at=0.0,
                        description=make_model(tmp_path / "src").description)
    entry = catalog.CatalogEntry(manifest=manifest, stores=["host-a"], sources=[catalog.StoreInfo(
        store_id="host-a", host="a", pid=1, root="/", free_bytes=0, url="http://127.0.0.1:9", token="t")])
    with pytest.raises(VllamaError, match="it names the file '../../outside.txt'"):
        fetch_from_peers(store, "evil:1b", entry, Progress(PullState(model="evil:1b", store_id="b")))
    assert not os.path.exists(tmp_path / "outside.txt") and leftovers(store) == []
