"""Ollama's blobs and /api/create from uploaded files: real Redis, real HTTP, real stores (pull
workers with their file servers, two "hosts" in this process), the API without a generation
worker; the official `ollama` client where it has a method. The GGUF path through real vLLM
is in tests/e2e/test_models.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import ollama
import pytest

from common import blob_catalog, catalog, keys
from tests.fake_stack import fake_stack
from tests.harness import async_wait_until, ndjson_lines
from tests.model_factory import write_model
from tests.test_peer_fetch import files_of, listed, stores
from common.blob_catalog import blob_route
from workers.blobs import BLOB_KEEP_S, PARTIAL_STALE_S, blob_dir, blob_path, sweep
from workers.pull import ensure_local
from workers.store import ModelStore

pytestmark = pytest.mark.asyncio(loop_scope="session")

WAIT_S = 60
MADE = "uploaded:1b"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(store: ModelStore) -> list[str]:
    folder = blob_dir(store)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def chunks(data: bytes, size: int = 32 * 1024):
    """As the official async client sends: 32 KiB pieces, no Content-Length."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


def model_files(tmp_path: Path) -> dict[str, Path]:
    """A small safetensors model directory as a client holds it: config, weights, tokenizer."""
    home = tmp_path / "client"
    manifest = write_model(home, "src:1b", chat_template="{{ messages[0]['content'] }}")
    directory = ModelStore(home / "models").model_dir(manifest)
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (directory / "sub").mkdir()
    (directory / "sub" / "extra.json").write_text("{}")
    return {str(p.relative_to(directory)): p for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- blobs


async def test_upload_head_and_upload_again(redis_server, tmp_path):
    async with stores(redis_server, tmp_path, "host-a") as (redis, a), \
            fake_stack(redis_server.url, worker=False, flush=False) as api, api.client() as http:
        data = os.urandom(300_000)
        digest = f"sha256:{sha(data)}"
        assert (await http.head(f"/api/blobs/{digest}")).status_code == 404
        r = await http.post(f"/api/blobs/{digest}", content=chunks(data))  # chunked, as the async client sends
        assert r.status_code == 201, r.text
        assert blob_path(a.store, sha(data)).read_bytes() == data
        assert leftovers(a.store) == [f"sha256-{sha(data)}"]
        assert (await http.head(f"/api/blobs/{digest}")).status_code == 200
        held = await blob_catalog.holders(redis, [sha(data)])
        assert [(s.store_id, n) for s, n in held[sha(data)]] == [("host-a", len(data))]

        r = await http.post(f"/api/blobs/{digest}", content=data)  # with a Content-Length
        assert r.status_code == 200, r.text

        # The official client (a file, sent with its length), and Ollama's dash spelling for HEAD.
        path = tmp_path / "file.bin"
        path.write_bytes(data[:1000])
        assert await ollama.AsyncClient(host=api.base_url).create_blob(path) == f"sha256:{sha(data[:1000])}"
        sync_client = ollama.Client(host=api.base_url)  # in a thread: the API runs in this loop
        assert await asyncio.to_thread(sync_client.create_blob, path) == f"sha256:{sha(data[:1000])}"
        assert (await http.head(f"/api/blobs/sha256-{sha(data[:1000])}")).status_code == 200

        r = await http.head("/api/blobs/sha256:" + "ab" * 32)
        assert r.status_code == 404
        r = await http.get("/api/blobs/sha256:" + "ab" * 32)
        assert r.status_code == 405
        r = await http.post("/api/blobs/sha256:" + "ab" * 32, content=b"x")
        assert r.status_code == 400
        assert r.json() == {"error": f'digest mismatch, expected "sha256:{"ab" * 32}", got "sha256:{sha(b"x")}"'}

        # Redis loses everything: the store writes its blobs again with its catalog.
        await redis.flushdb()
        await async_wait_until(lambda: _head(http, digest), WAIT_S, "the blob listed again after Redis lost it")


async def _head(http, digest: str) -> bool:
    return (await http.head(f"/api/blobs/{digest}")).status_code == 200


async def test_a_bad_upload_keeps_nothing(redis_server, tmp_path):
    async with stores(redis_server, tmp_path, "host-a") as (redis, a), \
            fake_stack(redis_server.url, worker=False, flush=False) as api, api.client() as http:
        data = os.urandom(3 * 2**20)
        wrong = "0" * 64
        r = await http.post(f"/api/blobs/sha256:{wrong}", content=chunks(data))
        assert r.status_code == 400
        assert r.json()["error"] == f'digest mismatch, expected "sha256:{wrong}", got "sha256:{sha(data)}"'
        assert leftovers(a.store) == [] and (await http.head(f"/api/blobs/sha256:{wrong}")).status_code == 404
        assert not await redis.hgetall(keys.blobs("host-a"))

        for bad in ("sha256:123", "sha256:" + "g" * 64, "md5:" + "0" * 64, "0" * 64, "sha256:" + "0" * 65):
            r = await http.post(f"/api/blobs/{bad}", content=b"x")
            assert r.status_code == 400 and "invalid digest format" in r.json()["error"], (bad, r.text)
            assert (await http.head(f"/api/blobs/{bad}")).status_code == 400

        # Larger than the store's free space: declared, refused before a byte is read; sent in
        # pieces without a length, refused when it gets there. Either way the message says so.
        a.store.free_bytes = lambda: 2 * 2**20
        await async_wait_until(lambda: _free_is(redis, 2 * 2**20), WAIT_S, "the store to report its free space")
        r = await http.post(f"/api/blobs/sha256:{sha(data)}", content=data)
        assert r.status_code == 507 and "more than the free space of any model store" in r.json()["error"], r.text
        r = await http.post(f"/api/blobs/sha256:{sha(data)}", content=chunks(data))
        assert r.status_code == 507, r.text
        assert "not enough disk space to upload blob sha256:" in r.json()["error"]
        assert leftovers(a.store) == []
        assert not await redis.hgetall(keys.disk_reservations("host-a"))


async def _free_is(redis, free: int) -> bool:
    return any(s.free_bytes == free for s in await catalog.live_stores(redis))


async def test_a_client_gone_mid_upload_leaves_no_blob(redis_server, tmp_path):
    async with stores(redis_server, tmp_path, "host-a") as (redis, a), \
            fake_stack(redis_server.url, worker=False, flush=False) as api, api.client() as http:
        digest = "sha256:" + "1" * 64
        url = urlparse(api.base_url)

        def start_upload() -> socket.socket:  # in a thread: the API runs in this loop
            sock = socket.create_connection((url.hostname, url.port))
            sock.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Content-Length: {10 * 2**20}\r\n\r\n".encode())
            sock.sendall(os.urandom(3 * 2**20))
            return sock

        sock = await asyncio.to_thread(start_upload)
        await async_wait_until(lambda: _partial(a.store), WAIT_S, "the upload to reach the store")
        sock.close()
        await async_wait_until(lambda: _nothing_left(a.store), WAIT_S, "the partial blob to be removed")
        assert (await http.head(f"/api/blobs/{digest}")).status_code == 404
        await async_wait_until(lambda: _no_reservation(redis), WAIT_S, "the upload's disk reservation to end")


async def _partial(store: ModelStore) -> bool:
    return any(name.endswith(".partial") for name in leftovers(store))


async def _nothing_left(store: ModelStore) -> bool:
    return leftovers(store) == []


async def _no_reservation(redis) -> bool:
    return not await redis.hgetall(keys.disk_reservations("host-a"))


async def test_the_store_takes_blobs_only_with_its_token(redis_server, tmp_path):
    async with stores(redis_server, tmp_path, "host-a") as (redis, a):
        [info] = await catalog.live_stores(redis)
        data = b"blob"
        url = info.url + blob_route(sha(data))
        async with httpx.AsyncClient(timeout=30) as http:
            assert (await http.put(url, content=data)).status_code == 401
            assert (await http.put(url, content=data, headers={"Authorization": "Bearer no"})).status_code == 401
            assert (await http.put(info.url + "/v1/blob/..%2F..%2Fx", content=data,
                                   headers={"Authorization": f"Bearer {info.token}"})).status_code in (404, 401)
            assert leftovers(a.store) == []


async def test_unused_blobs_go_after_a_day_and_used_ones_stay(tmp_path):
    store = ModelStore(tmp_path / "models")
    blob_dir(store).mkdir(parents=True)
    old, linked, fresh = ("a" * 64, "b" * 64, "c" * 64)
    for digest in (old, linked, fresh):
        blob_path(store, digest).write_bytes(b"x")
    store.local.mkdir(parents=True)
    os.link(blob_path(store, linked), store.local / "model.safetensors")  # a model made from it
    partial = blob_dir(store) / f".sha256-{old}.1234.partial"
    partial.write_bytes(b"x")
    day_ago = time.time() - BLOB_KEEP_S - 60
    for path in (blob_path(store, old), blob_path(store, linked), partial):
        os.utime(path, (day_ago, day_ago))
    assert sweep(store, time.time()) == [old]
    assert sorted(leftovers(store)) == [f"sha256-{linked}", f"sha256-{fresh}"]
    assert PARTIAL_STALE_S < BLOB_KEEP_S


# ---------------------------------------------------------------- create from files


async def test_create_from_safetensors_blobs_on_two_stores(redis_server, tmp_path):
    """Files uploaded to two stores: the one holding most of the bytes makes the model,
    fetching the others' blob; the model lists, shows, and reaches the other store too."""
    async with stores(redis_server, tmp_path, "host-a", "host-b") as (redis, a, b), \
            fake_stack(redis_server.url, worker=False, flush=False) as api, api.client() as http:
        paths = model_files(tmp_path)
        client = ollama.AsyncClient(host=api.base_url)
        infos = {s.store_id: s for s in await catalog.live_stores(redis)}
        files = {}
        for name, path in paths.items():
            if name == "config.json":  # straight to B's file server, as an API replica would
                data = path.read_bytes()
                async with httpx.AsyncClient(timeout=30) as direct:
                    r = await direct.put(infos["host-b"].url + blob_route(sha(data)), content=data,
                                         headers={"Authorization": f"Bearer {infos['host-b'].token}"})
                assert r.status_code == 201, r.text
                files[name] = f"sha256:{sha(data)}"
            else:
                a.store.free_bytes = lambda: 10**15  # A: the roomiest, so the API sends the rest there
                await async_wait_until(lambda: _free_is(redis, 10**15), WAIT_S, "A to report its free space")
                files[name] = await client.create_blob(path)
        assert set(files) == {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
                              "sub/extra.json"}

        statuses = [p.status async for p in await client.create(model=MADE, files=files, stream=True,
                                                                system="You are made of blobs.",
                                                                parameters={"temperature": 0.2})]
        assert statuses[0] == "converting model" and statuses[-2:] == ["writing manifest", "success"]
        assert {f"using existing layer {d}" for d in files.values()} <= set(statuses)

        made = a.store.get(MADE)
        assert made is not None and b.store.get(MADE) is None
        assert files_of(a.store, MADE) == {name: p.read_bytes() for name, p in paths.items()}
        weights = a.store.model_dir(made) / "model.safetensors"
        assert weights.stat().st_ino == blob_path(a.store, files["model.safetensors"][7:]).stat().st_ino
        assert blob_path(a.store, files["config.json"][7:]).exists()  # fetched from B
        assert {f.path: f.digest for f in made.files} == files

        models = {m.model: m for m in (await client.list()).models}
        assert models[MADE].details.family == "llama" and models[MADE].details.format == "safetensors"
        shown = await client.show(MADE)
        assert "SYSTEM You are made of blobs." in shown.modelfile and "PARAMETER temperature 0.2" in shown.modelfile
        assert (await http.post("/api/show", json={"model": MADE})).json()["system"] == "You are made of blobs."

        # On another machine the model arrives by the peer fetch, as any model made on one does.
        entry = await listed(redis, MADE, "host-a")
        path = await asyncio.to_thread(ensure_local, b.store, MADE, entry)
        assert files_of(b.store, MADE) == files_of(a.store, MADE) and path.is_relative_to(b.store.root)

        # The same files again, not streamed: one object; the directory is shared.
        r = await http.post("/api/create", json={"model": "again:1b", "files": files, "stream": False})
        assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
        assert a.store.get("again:1b").path == made.path

        # Deleting both models leaves the blobs to their day (then the sweep takes them).
        await client.delete(MADE)
        await client.delete("again:1b")
        assert blob_path(a.store, files["model.safetensors"][7:]).stat().st_nlink == 1


@pytest.mark.parametrize(("files", "extra", "status", "message"), [
    ({"../config.json": "x"}, {}, 400, 'file name "../config.json" is refused'),
    ({"/etc/config.json": "x"}, {}, 400, "absolute path"),
    ({"a/../config.json": "x"}, {}, 400, "climbs out"),
    ({"a\\config.json": "x"}, {}, 400, "backslash"),
    ({"config.json": "x", "model.safetensors": "x"}, {}, 400, "the tokenizer"),
    ({"model.gguf": "x", "config.json": "x"}, {}, 400, "send one GGUF file alone"),
    ({"model.gguf": "sha256:123"}, {}, 400, "invalid digest format"),
    ({"model.gguf": "missing"}, {}, 400, "not found; upload it first with POST /api/blobs/sha256:"),
    ({"model.gguf": "x"}, {"adapters": {"a.safetensors": "x"}}, 400, "adapters are not supported"),
    ({"model.gguf": "x"}, {"quantize": "q4_K_M"}, 400, "quantize is not supported"),
    ({"model.gguf": "x"}, {"from": "fake:test"}, 400, 'send either "from"'),
    ({"model.gguf": "x"}, {"template": "{{ .Prompt "}, 400, "unclosed action"),
])
async def test_bad_creates_from_files_say_what_is_wrong(redis_server, tmp_path, files, extra, status, message):
    async with stores(redis_server, tmp_path, "host-a") as (redis, a), \
            fake_stack(redis_server.url, worker=False, flush=False) as api, api.client() as http:
        data = b"GGUF-ish"
        await http.post(f"/api/blobs/sha256:{sha(data)}", content=data)
        digests = {"x": f"sha256:{sha(data)}", "missing": "sha256:" + "9" * 64}
        body = {"model": MADE, "files": {k: digests.get(v, v) for k, v in files.items()}, **extra}
        for stream in (True, False):
            r = await http.post("/api/create", json={**body, "stream": stream})
            assert r.status_code == status and message in r.json()["error"], r.text
        assert a.store.get(MADE) is None and not (a.store.local.exists() and list(a.store.local.iterdir()))


async def test_files_that_cannot_load_fail_in_band_and_leave_nothing(redis_server, tmp_path):
    async with stores(redis_server, tmp_path, "host-a") as (redis, a), \
            fake_stack(redis_server.url, worker=False, flush=False) as api, api.client() as http:
        async def upload(data: bytes) -> str:
            assert (await http.post(f"/api/blobs/sha256:{sha(data)}", content=data)).status_code in (200, 201)
            return f"sha256:{sha(data)}"

        not_gguf = await upload(b"not a gguf file")
        r = await http.post("/api/create", json={"model": MADE, "files": {"model.gguf": not_gguf}})
        lines = ndjson_lines(r.text)
        assert r.status_code == 200 and lines[0] == {"status": "parsing GGUF"}
        assert "is named .gguf but is not a GGUF file" in lines[-1]["error"], lines

        files = {"config.json": await upload(b'{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}'),
                 "model.safetensors": await upload(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "),
                 "tokenizer.json": await upload(b"{}")}
        r = await http.post("/api/create", json={"model": MADE, "files": files, "stream": False})
        assert r.status_code == 400 and "model.safetensors is not a safetensors file" in r.json()["error"], r.text
        index = json.dumps({"weight_map": {"w": "../../../manifests/x.safetensors"}}).encode()
        files = {name: await upload(p.read_bytes()) for name, p in model_files(tmp_path).items()}
        files["model.safetensors.index.json"] = await upload(index)
        r = await http.post("/api/create", json={"model": MADE, "files": files, "stream": False})
        assert r.status_code == 400 and "climbs out" in r.json()["error"], r.text
        assert a.store.get(MADE) is None and not list(a.store.local.iterdir())
