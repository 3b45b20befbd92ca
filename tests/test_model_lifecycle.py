"""Models on disk, loaded, unloaded: /api/tags, /api/show, /api/ps, delete, copy, load on
demand and keep_alive, with the fake engine standing in for vLLM (real Redis, real HTTP, the
real pull worker and generation worker). tests/e2e does the same through real vLLM."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import pytest

from common import keys
from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until
from tests.model_factory import write_model
from workers.fake_engine import FakeEngine
from workers.store import ModelStore

pytestmark = pytest.mark.asyncio(loop_scope="session")

OTHER = "other:1b"


async def ps(http) -> dict[str, dict]:
    return {m["name"]: m for m in (await http.get("/api/ps")).json()["models"]}


async def wait_listed(http, name: str, present: bool = True) -> None:
    async def check() -> bool:
        names = {m["name"] for m in (await http.get("/api/tags")).json()["models"]}
        return (name in names) == present
    await async_wait_until(check, 10, f"{name} {'in' if present else 'out of'} /api/tags")


async def test_tags_show_copy_delete(redis_server, tmp_path):
    manifest = write_model(tmp_path, OTHER)
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        await wait_listed(http, OTHER)
        [entry] = (await http.get("/api/tags")).json()["models"]
        assert entry["name"] == entry["model"] == OTHER
        assert entry["size"] == manifest.size and entry["digest"] == manifest.digest
        assert entry["details"]["family"] == "llama" and entry["details"]["format"] == "safetensors"
        assert entry["modified_at"].endswith("Z")
        assert (await http.head("/api/tags")).status_code == 200

        shown = (await http.post("/api/show", json={"model": OTHER})).json()
        assert shown["model_info"]["general.architecture"] == "llama"
        assert shown["model_info"]["llama.context_length"] == 512
        assert shown["model_info"]["general.parameter_count"] == 16 * 8
        assert "completion" in shown["capabilities"]
        r = await http.post("/api/show", json={"model": "missing:1b"})
        assert r.status_code == 404 and r.json() == {"error": "model 'missing:1b' not found"}

        r = await http.post("/api/copy", json={"source": OTHER, "destination": "backup"})
        assert r.status_code == 200 and r.content == b""
        await wait_listed(http, "backup:latest")
        model_dir = stack.pull_worker.store.model_dir(manifest)
        r = await http.post("/api/copy", json={"source": "nope", "destination": "x"})
        assert r.status_code == 404 and r.json() == {"error": 'model "nope:latest" not found'}
        r = await http.post("/api/copy", json={"source": OTHER, "destination": "../etc"})
        assert r.status_code == 400 and r.json() == {"error": 'destination "../etc" is invalid'}

        # Deleting one of two names keeps the files; deleting the last removes them.
        r = await http.request("DELETE", "/api/delete", json={"model": OTHER})
        assert r.status_code == 200 and r.content == b""
        await wait_listed(http, OTHER, present=False)
        assert (model_dir / "model.safetensors").exists()
        assert (await http.request("DELETE", "/api/delete", json={"model": "backup"})).status_code == 200
        assert not model_dir.exists()
        r = await http.request("DELETE", "/api/delete", json={"model": "backup"})
        assert r.status_code == 404 and r.json() == {"error": "model 'backup:latest' not found"}
        r = await http.request("DELETE", "/api/delete", json={"model": "a b"})
        assert r.status_code == 400 and r.json() == {"error": 'name "a b" is invalid'}


async def test_store_version_sees_a_replaced_manifest_within_one_clock_tick(tmp_path):
    """File times tick coarsely: a manifest replaced by rename can leave the directory's
    mtime as it was. The version must change anyway, or a stale catalog is never resynced."""
    manifest = write_model(tmp_path, OTHER)
    store = ModelStore(tmp_path / "models")
    before = store.version()
    times = store.manifests.stat()
    store.save(manifest.model_copy(update={"modified_at": manifest.modified_at + 1}))
    os.utime(store.manifests, ns=(times.st_atime_ns, times.st_mtime_ns))  # as if in the same tick
    assert store.version() != before
    assert store.version() == store.version()


async def test_a_resync_from_disk_racing_a_copy_does_not_hide_it(redis_server, tmp_path):
    """The heartbeat resyncs the catalog from disk when the store changes; a listing taken
    just before a copy (or pull) saved its manifest must not land after the copy's update."""
    write_model(tmp_path, OTHER)
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        await wait_listed(http, OTHER)
        store = stack.pull_worker.store
        listed = threading.Event()

        def slow_list(list_now=store.list):
            found = list_now()
            listed.set()
            time.sleep(0.5)  # the copy job arrives while this listing is in hand
            return found

        store.list = slow_list
        resync = asyncio.create_task(stack.pull_worker._resync())
        await asyncio.to_thread(listed.wait, 5)
        r = await http.post("/api/copy", json={"source": OTHER, "destination": "backup"})
        assert r.status_code == 200
        await resync
        del store.list
        names = {m["name"] for m in (await http.get("/api/tags")).json()["models"]}
        assert names == {OTHER, "backup:latest"}


async def test_model_on_disk_is_loaded_on_demand_and_unloaded_by_keep_alive(redis_server, tmp_path):
    write_model(tmp_path, OTHER)
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path, max_loaded_models=2) as stack, \
            stack.client() as http:
        await wait_listed(http, OTHER)
        assert OTHER not in await ps(http)
        r = await http.post("/api/generate", json={"model": OTHER, "prompt": "hi", "stream": False,
                                                   "keep_alive": "1s"})
        assert r.status_code == 200, r.text
        assert r.json()["done_reason"] == "stop"
        assert r.json()["load_duration"] > 0  # it waited for the load
        again = await http.post("/api/generate", json={"model": OTHER, "prompt": "hi", "stream": False,
                                                       "keep_alive": "1s"})
        assert again.json()["load_duration"] == 0
        loaded = await ps(http)
        assert set(loaded) == {MODEL, OTHER}
        assert loaded[OTHER]["workers"][0]["worker_id"] == stack.worker.worker_id
        assert loaded[OTHER]["context_length"] == 2048 and loaded[OTHER]["size"] > 0
        # The worker's own model stays loaded; the other goes one idle second later.
        assert loaded[MODEL]["expires_at"] > "2300"

        async def unloaded() -> bool:
            return OTHER not in await ps(http)
        await async_wait_until(unloaded, 5, f"{OTHER} to be unloaded after keep_alive 1s")
        assert MODEL in await ps(http)


async def test_load_and_unload_requests(redis_server, tmp_path):
    write_model(tmp_path, OTHER)
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path, max_loaded_models=2) as stack, \
            stack.client() as http:
        await wait_listed(http, OTHER)
        r = await http.post("/api/generate", json={"model": OTHER})
        assert r.status_code == 200 and r.json()["done_reason"] == "load" and r.json()["response"] == ""
        loaded = await ps(http)
        assert OTHER in loaded
        expires = loaded[OTHER]["expires_at"]
        assert "2026" <= expires < "2300"  # the default 5 minutes, not forever

        r = await http.post("/api/chat", json={"model": OTHER, "messages": [], "keep_alive": -1})
        assert r.json()["done_reason"] == "load" and r.json()["message"] == {"role": "assistant", "content": ""}

        async def forever() -> bool:
            return (await ps(http))[OTHER]["expires_at"] > "2300"
        await async_wait_until(forever, 3, "keep_alive -1 to show as a far-future expiry")

        r = await http.post("/api/chat", json={"model": OTHER, "messages": [], "keep_alive": 0})
        assert r.json()["done_reason"] == "unload"
        assert OTHER not in await ps(http)
        # keep_alive is not sticky: the next plain request loads with the default again.
        r = await http.post("/api/generate", json={"model": OTHER, "prompt": "x", "stream": False})
        assert r.status_code == 200
        assert await stack.redis.get(keys.keep_alive(OTHER)) is None

        r = await http.post("/api/generate", json={"model": OTHER, "keep_alive": "soon"})
        assert r.status_code == 400 and "keep_alive" in r.json()["error"]


async def test_full_worker_unloads_an_idle_model_to_load_another(redis_server, tmp_path):
    write_model(tmp_path, OTHER)
    write_model(tmp_path, MODEL)
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path, max_loaded_models=1) as stack, \
            stack.client() as http:
        await wait_listed(http, OTHER)
        r = await http.post("/api/generate", json={"model": OTHER, "prompt": "x", "stream": False})
        assert r.status_code == 200
        assert set(await ps(http)) == {OTHER}
        # And back: the first model is loaded again on request.
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False})
        assert r.status_code == 200
        assert set(await ps(http)) == {MODEL}


async def test_model_that_cannot_be_had(redis_server, tmp_path):
    write_model(tmp_path, OTHER)

    def factory(name, path):
        raise RuntimeError("out of memory (simulated)")

    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path, max_loaded_models=2,
                          engine_factory=factory, models=f"{MODEL},{OTHER}") as stack, stack.client() as http:
        await wait_listed(http, OTHER)
        r = await http.post("/api/generate", json={"model": "nowhere:7b", "prompt": "x"})
        assert r.status_code == 404
        assert r.json()["error"] == "model 'nowhere:7b' not found, try pulling it first: ollama pull nowhere:7b"

        started = time.monotonic()
        r = await http.post("/api/generate", json={"model": OTHER, "prompt": "x"})
        assert r.status_code == 500 and "out of memory (simulated)" in r.json()["error"]
        assert time.monotonic() - started < 5
        assert OTHER not in await ps(http)

        write_model(tmp_path, "forbidden:1b")
        await wait_listed(http, "forbidden:1b")
        r = await http.post("/api/generate", json={"model": "forbidden:1b", "prompt": "x"})
        assert r.status_code == 503 and "VLLAMA_MODELS" in r.json()["error"]


async def test_request_waits_for_a_worker_that_starts_later(redis_server, tmp_path):
    """No worker holds the model: the job waits in the queue until one loads it."""
    write_model(tmp_path, OTHER)
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path, max_loaded_models=2,
                          engine=FakeEngine(step_s=0.01)) as stack, stack.client() as http:
        await wait_listed(http, OTHER)
        requests = [asyncio.create_task(http.post("/api/generate", json={"model": OTHER, "prompt": "x",
                                                                         "stream": False}))
                    for _ in range(5)]
        results = await asyncio.gather(*requests)
        assert [r.status_code for r in results] == [200] * 5
        assert all(r.json()["eval_count"] == 16 for r in results)
        # One load served them all.
        record = json.loads(await stack.redis.get(keys.load_record(OTHER)))
        assert record["status"] == "ready" and record["worker_id"] == stack.worker.worker_id
        assert await stack.redis.zcard(keys.LOADS) == 0


async def test_an_embedding_model_loads_beside_the_chat_model_not_instead(redis_server, tmp_path):
    """A retrieval app asks for embeddings and chat in turn: with one model per worker
    (VLLAMA_MAX_LOADED_MODELS=1) an embedding model still loads beside the chat model, and a
    second embedding model replaces the first, not the chat model."""
    from common.model_info import is_embedding_model

    write_model(tmp_path, MODEL)
    for name in ("embedder:1", "embedder:2"):
        write_model(tmp_path, name, architecture="BertModel")
    factory = lambda name, path: FakeEngine(embedding=is_embedding_model(path))  # noqa: E731
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path, max_loaded_models=1,
                          engine_factory=factory) as stack, stack.client() as http:
        await wait_listed(http, "embedder:2")
        r = await http.post("/api/embed", json={"model": "embedder:1", "input": "x"})
        assert r.status_code == 200, r.text
        assert set(await ps(http)) == {MODEL, "embedder:1"}
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False})
        assert r.status_code == 200 and r.json()["load_duration"] == 0  # never unloaded
        r = await http.post("/api/embed", json={"model": "embedder:2", "input": "x"})
        assert r.status_code == 200, r.text
        assert set(await ps(http)) == {MODEL, "embedder:2"}
