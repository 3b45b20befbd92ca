"""Pulls that cannot be abused or fill the disk: real Redis, real HTTP, the real pull worker and
huggingface_hub against the Hub stand-in (tests/hub_standin.py).

- auto-pull (a request naming a model no store has) fetches only alias-table names unless
  VLLAMA_AUTO_PULL=any; explicit /api/pull still pulls anything;
- concurrent pulls reserve disk space, so two cannot both pass the free-space check;
- repo ids match whatever their case, as on the Hub, and are kept under the Hub's spelling;
- a failed pull cleans up after itself, and what a killed one left goes with /api/delete;
- names inside downloaded data (index files, listings, peers' manifests) stay inside the model.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from common import catalog, keys
from common.catalog import Manifest
from common.errors import InsufficientStorage, VllamaError
from common.model_paths import path_problem
from common.models import name_key, same_model
from common.redis_conn import connect
from tests.fake_stack import fake_stack
from tests.harness import Proc, async_wait_until
from tests.hub_standin import HubStandin, isolate_hf_client
from tests.model_factory import embedding_bytes, make_tiny_llama, write_model
from tests.test_peer_fetch import leftovers, listed, make_model, stores
from workers.disk_space import DiskReservations
from workers.pull import ensure_local
from workers.store import ModelStore, describe_files

pytestmark = pytest.mark.asyncio(loop_scope="session")

REPO = "tiny-org/tiny-llama"
OTHER = "tiny-org/other-llama"
CASED = "Tiny-Org/Cased-Llama"
ALIAS, ALIAS_REPO = "tinyllama:1.1b", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
EVIL_INDEX = "tiny-org/evil-index"
EVIL_LISTING = "tiny-org/evil-listing"
SHARD = "model-00001-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", max_shard_bytes=embedding_bytes() + 2**20)


@pytest.fixture(scope="module")
def evil_dir(model_dir, tmp_path_factory) -> Path:
    """The tiny model, but its index sends one tensor's shard outside the model directory."""
    evil = tmp_path_factory.mktemp("evil") / "model"
    shutil.copytree(model_dir, evil)
    index = json.loads((evil / INDEX).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../../../../../etc/hostname"
    (evil / INDEX).write_text(json.dumps(index))
    return evil


@pytest.fixture
def hub(model_dir, evil_dir, monkeypatch, tmp_path):
    isolate_hf_client(monkeypatch, tmp_path / "hf_home")
    with HubStandin() as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        for repo in (REPO, OTHER, CASED, ALIAS_REPO):
            standin.add_repo(repo, model_dir)
        standin.add_repo(EVIL_INDEX, evil_dir)
        standin.add_repo(EVIL_LISTING, model_dir)
        standin.add_virtual_file(EVIL_LISTING, "..", 10)
        yield standin


def model_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())


def hub_folders(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "models" / "hub").glob("models--*"))


async def tags(http) -> list[str]:
    return [m["name"] for m in (await http.get("/api/tags")).json()["models"]]


# ---------------------------------------------------------------- auto-pull


async def test_auto_pull_fetches_only_aliases_by_default(redis_server, tmp_path, hub):
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path, auto_pull="aliases",
                          max_loaded_models=2) as stack, stack.client() as http:
        for path, body in [("/api/generate", {"prompt": "hi"}),
                           ("/api/chat", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]:
            r = await http.post(path, json={"model": REPO, "stream": False, **body})
            assert r.status_code == 404, (path, r.text)
        r = await http.post("/api/generate", json={"model": REPO, "prompt": "hi", "stream": False})
        assert "not found, try pulling it first" in r.json()["error"]
        assert hub.requests == [], "a request started a download of a repo outside the alias table"
        assert await tags(http) == []

        # A name from the alias table is pulled and served on first use.
        r = await http.post("/api/generate", json={"model": ALIAS, "prompt": "hi", "stream": False}, timeout=120)
        assert r.status_code == 200, r.text
        assert hub.count("GET", SHARD) == 1
        assert await tags(http) == [ALIAS]

        # An explicit pull still pulls any repo.
        r = await http.post("/api/pull", json={"model": REPO, "stream": False}, timeout=120)
        assert r.status_code == 200 and r.json() == {"status": "success"}, r.text


async def test_auto_pull_off_pulls_nothing_and_any_pulls_repos(redis_server, tmp_path, hub):
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path, auto_pull="off") as stack, \
            stack.client() as http:
        r = await http.post("/api/generate", json={"model": ALIAS, "prompt": "hi", "stream": False})
        assert r.status_code == 404 and hub.requests == []
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path, auto_pull="any",
                          max_loaded_models=2) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": OTHER, "prompt": "hi", "stream": False}, timeout=120)
        assert r.status_code == 200, r.text


# ---------------------------------------------------------------- disk space


async def test_reservations_are_shared_expire_and_shrink(redis_server):
    """Two pull workers of one store (two objects, as two processes or machines would hold):
    what one holds the other cannot have; a reservation whose worker stopped renewing lapses;
    renewing with the bytes still to write gives back what was written."""
    redis = await connect(redis_server.url)
    try:
        await redis.delete(keys.disk_reservations("shared"))
        a, b = DiskReservations(redis, "shared"), DiskReservations(redis, "shared")
        await a.reserve("pull-a", "model-a", needed=60, free=100)
        with pytest.raises(InsufficientStorage) as refused:
            await b.reserve("pull-b", "model-b", needed=60, free=100)
        assert refused.value.status == 507
        assert "needs 60 B" in refused.value.message and "100 B are free" in refused.value.message
        assert "60 B of that is held by other pulls" in refused.value.message
        await a.renew("pull-a", 30)  # half written
        await b.reserve("pull-b", "model-b", needed=60, free=100)
        await a.release("pull-a")
        await b.release("pull-b")
        assert await redis.exists(keys.disk_reservations("shared")) == 0

        dying = DiskReservations(redis, "shared", ttl_s=0.2)
        await dying.reserve("pull-dead", "model-c", needed=90, free=100)
        with pytest.raises(InsufficientStorage):
            await a.reserve("pull-a", "model-a", needed=60, free=100)
        await asyncio.sleep(1.0)  # its worker died: nobody renews it
        await a.reserve("pull-a", "model-a", needed=60, free=100)
        assert set((await a.held())) == {"pull-a"}
        await a.renew("pull-gone", 5)  # renewing what is not there adds nothing
        assert set((await a.held())) == {"pull-a"}
        assert 0 < await redis.pttl(keys.disk_reservations("shared")) <= 60_000
    finally:
        await redis.delete(keys.disk_reservations("shared"))
        await redis.aclose()


async def test_two_pulls_cannot_both_take_the_same_free_space(redis_server, tmp_path, hub, model_dir, monkeypatch):
    """A disk with room for one model and a half: the first pull holds its size while it
    downloads, so the second, started meanwhile, is refused at once with 507; once the first
    is done its reservation is gone."""
    size = model_bytes(model_dir)
    monkeypatch.setattr(ModelStore, "free_bytes", lambda self: size * 3 // 2)
    hub.bytes_per_s = 5e6  # the first pull takes about 5 s
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        reservations = keys.disk_reservations(stack.pull_worker.store_id)
        first = asyncio.create_task(http.post("/api/pull", json={"model": REPO, "stream": False}, timeout=120))

        async def downloading() -> bool:
            raw = await stack.redis.get(keys.pull_record(stack.pull_worker.store_id, REPO))
            return raw is not None and json.loads(raw)["status"] == "downloading"
        await async_wait_until(downloading, 30, "the first pull to be downloading")

        r = await http.post("/api/pull", json={"model": OTHER, "stream": False}, timeout=120)
        assert r.status_code == 507, r.text
        assert await stack.redis.hlen(reservations) == 1  # the first pull's
        error = r.json()["error"]
        assert "not enough disk space" in error and "needs" in error and "are free" in error
        assert "held by other pulls" in error and "VLLAMA_HOME" in error
        assert str(tmp_path) not in error  # no local paths in errors
        assert not first.done()

        r = await first
        assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
        assert await stack.redis.hlen(reservations) == 0
        assert not [p for m, p, _ in hub.requests if m == "GET" and p.startswith(f"/{OTHER}/resolve")]
        hub.bytes_per_s = None
        r = await http.post("/api/pull", json={"model": OTHER, "stream": False}, timeout=120)
        assert r.status_code == 200, r.text  # the space is free again
        assert await stack.redis.hlen(reservations) == 0


# ---------------------------------------------------------------- repo ids and case


async def test_name_keys():
    assert name_key("Qwen/Qwen2.5-7B-Instruct") == name_key("QWEN/qwen2.5-7b-instruct") == "qwen/qwen2.5-7b-instruct"
    assert name_key("hf.co/Qwen/X@Main") == "qwen/x@Main"  # a branch name keeps its case
    assert name_key("Llama3.1:8B") == "llama3.1:8b"  # Ollama names: lower case already
    assert same_model("org/Name", "ORG/name") and not same_model("org/name", "org/name@v1")


async def test_repo_ids_match_whatever_their_case(redis_server, tmp_path, hub, model_dir):
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path,
                          max_loaded_models=2) as stack, stack.client() as http:
        # Asked in lower case: kept under the Hub's spelling.
        r = await http.post("/api/pull", json={"model": "tiny-org/cased-llama", "stream": False}, timeout=120)
        assert r.status_code == 200, r.text
        assert await tags(http) == [CASED]
        # Asked again in another case: the same model, nothing fetched again.
        r = await http.post("/api/pull", json={"model": "TINY-ORG/CASED-LLAMA", "stream": False}, timeout=120)
        assert r.status_code == 200, r.text
        assert hub.count("GET", SHARD) == 1
        assert await tags(http) == [CASED]
        assert hub_folders(tmp_path) == ["models--Tiny-Org--Cased-Llama"]
        assert [m.name for m in stack.pull_worker.store.list()] == [CASED]

        r = await http.post("/api/show", json={"model": "tiny-ORG/cased-LLAMA"})
        assert r.status_code == 200, r.text
        for spelling in ("TINY-ORG/cased-llama", CASED, "tiny-org/CASED-llama"):
            r = await http.post("/api/generate", json={"model": spelling, "prompt": "hi", "stream": False})
            assert r.status_code == 200, (spelling, r.text)
        assert [m["name"] for m in (await http.get("/api/ps")).json()["models"] if m["name"] != "fake:test"] == [CASED]

        r = await http.request("DELETE", "/api/delete", json={"model": "TINY-ORG/CASED-LLAMA"})
        assert r.status_code == 200, r.text
        assert await tags(http) == [] and hub_folders(tmp_path) == []


# ---------------------------------------------------------------- failed pulls


async def test_a_failed_pull_leaves_nothing_it_cannot_remove(redis_server, tmp_path, hub, model_dir):
    """The Hub fails mid-download: the files fetched whole are kept for the next pull (the
    error says how to remove them), nothing partial stays, and /api/delete removes them."""
    hub.cut_once(REPO, SHARD, 11 * 2**20, then_fail=True)
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        r = await http.post("/api/pull", json={"model": REPO, "stream": False}, timeout=120)
        assert r.status_code == 502 and f"ollama rm {REPO}" in r.json()["error"], r.text
        assert await stack.redis.hlen(keys.disk_reservations(stack.pull_worker.store_id)) == 0
        assert await tags(http) == []
        assert hub_folders(tmp_path) == ["models--tiny-org--tiny-llama"]
        assert not list((tmp_path / "models").rglob("*.incomplete"))

        r = await http.request("DELETE", "/api/delete", json={"model": REPO})
        assert r.status_code == 200, r.text
        assert hub_folders(tmp_path) == []
        r = await http.request("DELETE", "/api/delete", json={"model": REPO})
        assert r.status_code == 404 and "not found" in r.json()["error"]


async def test_what_a_killed_pull_left_goes_with_delete(redis_server, tmp_path, hub, model_dir):
    """A pull worker killed (SIGKILL) mid-download cannot clean up: /api/delete of the model's
    name removes what it left, partial files included."""
    hub.bytes_per_s = 8e6
    env = {"VLLAMA_REDIS_URL": redis_server.url, "VLLAMA_HOME": str(tmp_path), "VLLAMA_STORE_ID": "box",
           "VLLAMA_HEARTBEAT_INTERVAL_S": "0.2", "VLLAMA_HEARTBEAT_TTL_S": "1", "HF_ENDPOINT": hub.endpoint,
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": ""}
    async with fake_stack(redis_server.url, home=tmp_path) as stack, stack.client() as http:
        async def store_up() -> bool:
            return bool(await catalog.live_stores(stack.redis))

        puller = Proc(["pull-worker"], env, tmp_path / "puller1.log")
        try:
            await async_wait_until(store_up, 30, "the pull worker to start")
            first = asyncio.create_task(http.post("/api/pull", json={"model": REPO}, timeout=60))

            async def shard_under_way() -> bool:
                raw = await stack.redis.get(keys.pull_record("box", REPO))
                files = json.loads(raw)["files"] if raw else []
                return any(f["path"] == SHARD and 0 < f["completed"] < f["total"] for f in files)
            await async_wait_until(shard_under_way, 30, "the shard download to be under way")
            puller.kill()
            await first
        finally:
            puller.kill()
        assert hub_folders(tmp_path) == ["models--tiny-org--tiny-llama"]

        puller = Proc(["pull-worker"], env, tmp_path / "puller2.log")
        try:
            await async_wait_until(store_up, 30, "the second pull worker to start")
            r = await http.request("DELETE", "/api/delete", json={"model": REPO})
            assert r.status_code == 200, r.text
        finally:
            puller.stop()
    assert hub_folders(tmp_path) == []
    assert not list((tmp_path / "models").rglob("*.incomplete"))


# ---------------------------------------------------------------- names inside downloaded data


async def test_path_problem():
    for bad in ["", ".", "..", "../x", "a/../b", "/etc/passwd", "a//b", "a\\b", "x\0", "./a", "a/"]:
        assert path_problem(bad) is not None, bad
    for good in ["model.safetensors", "1_Pooling/config.json", "a.b-c_d"]:
        assert path_problem(good) is None, good


async def test_an_index_naming_files_outside_the_model_fails_the_pull(redis_server, tmp_path, hub):
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        r = await http.post("/api/pull", json={"model": EVIL_INDEX, "stream": False}, timeout=120)
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert INDEX in error and "/etc/hostname" in error and "keeps nothing" in error
        assert await tags(http) == [] and hub_folders(tmp_path) == []

        r = await http.post("/api/pull", json={"model": EVIL_LISTING, "stream": False}, timeout=120)
        assert r.status_code == 502 and "'..'" in r.json()["error"], r.text
        assert not [p for m, p, _ in hub.requests if m == "GET" and p.startswith(f"/{EVIL_LISTING}/resolve")]  # refused before fetching anything
        assert await stack.redis.hlen(keys.disk_reservations(stack.pull_worker.store_id)) == 0


async def test_a_model_whose_files_lead_out_of_the_store_is_not_loaded(tmp_path):
    """A symlink planted in a model's directory (by hand, or an older version) that leads out
    of the store: the model is refused before anything reads it."""
    manifest = write_model(tmp_path, "planted:1b")
    store = ModelStore(tmp_path / "models")
    weights = store.model_dir(manifest) / "model.safetensors"
    outside = tmp_path / "secret.safetensors"
    weights.rename(outside)
    os.symlink(outside, weights)
    with pytest.raises(VllamaError) as refused:
        ensure_local(store, "planted:1b", None)
    assert "model.safetensors leads outside the model store" in refused.value.message
    assert str(tmp_path) not in refused.value.message


async def test_a_peers_index_naming_files_outside_is_refused(redis_server, tmp_path):
    """A model made on another machine whose index names a file outside it: fetching it fails
    and leaves nothing, whatever the manifest's digests say."""
    async with stores(redis_server, tmp_path, "a", "b") as (redis, a, b):
        manifest = make_model(tmp_path / "a", "planted:1b")
        directory = a.store.model_dir(manifest)
        (directory / INDEX).write_text(json.dumps({"weight_map": {"w": "../../../etc/hostname"}}))
        files = describe_files(directory)
        a.store.save(manifest.model_copy(update={"files": files, "size": sum(f.size for f in files),
                                                 "digest": Manifest.digest_of(files)}))
        entry = await listed(redis, "planted:1b", "a")

        async def has_index() -> bool:
            latest = await catalog.lookup(redis, "planted:1b")
            return latest is not None and INDEX in {f.path for f in latest.manifest.files}
        await async_wait_until(has_index, 60, "the catalog to list the index")
        entry = await listed(redis, "planted:1b", "a")
        with pytest.raises(VllamaError) as refused:
            await asyncio.to_thread(ensure_local, b.store, "planted:1b", entry)
        assert "/etc/hostname" in refused.value.message
        assert leftovers(b.store) == []
