"""/api/pull end to end with the real huggingface_hub client against the Hub stand-in: real
Redis, real HTTP, the real pull worker; files are compared byte for byte. (The generation
worker runs the fake engine; tests/e2e loads a pulled model in real vLLM.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from cli.embedded_redis import free_port
from common import catalog, keys
from tests.fake_stack import fake_stack
from tests.harness import Proc, async_wait_until, ndjson_lines, run_cli
from tests.hub_standin import HubStandin, isolate_hf_client
from tests.model_factory import embedding_bytes, make_tiny_llama
from workers.store import ModelStore

pytestmark = pytest.mark.asyncio(loop_scope="session")

REPO = "tiny-org/tiny-llama"
GATED = "tiny-org/gated-llama"
HUGE = "tiny-org/huge-llama"
SHARD = "model-00001-of-00002.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", max_shard_bytes=embedding_bytes() + 2**20)


@pytest.fixture
def hub(model_dir, monkeypatch, tmp_path):
    """The stand-in with a public, a gated and a too-big repo; the client pointed at it and
    kept away from any real token or cache."""
    isolate_hf_client(monkeypatch, tmp_path / "hf_home")
    with HubStandin() as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        standin.add_repo(REPO, model_dir)
        standin.add_repo(GATED, model_dir, gated=True)
        standin.add_repo(HUGE, model_dir)
        standin.add_virtual_file(HUGE, "model-huge.safetensors", 10**15)
        yield standin


def source_files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}


def pulled_files(stack, name: str) -> dict[str, bytes]:
    store = stack.pull_worker.store
    directory = store.model_dir(store.get(name))
    return {p.name: p.read_bytes() for p in directory.iterdir()}


async def pull(http, model: str, **body) -> list[dict]:
    r = await http.post("/api/pull", json={"model": model, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return ndjson_lines(r.text)


def check_progress(lines: list[dict], model_dir: Path) -> None:
    """Ollama's sequence, with byte counts that add up to each file's size."""
    statuses = [line.get("status") for line in lines]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    progress = [line for line in lines if "digest" in line]
    sizes = sorted(p.stat().st_size for p in model_dir.iterdir())
    last = {}
    for line in progress:
        assert line["status"] == f"pulling {line['digest'][7:19]}"
        assert line["digest"].startswith("sha256:") and len(line["digest"]) == 71
        assert 0 <= line["completed"] <= line["total"]
        assert line["completed"] >= last.get(line["digest"], {}).get("completed", 0), "progress went backwards"
        last[line["digest"]] = line
    assert sorted(line["total"] for line in last.values()) == sizes
    assert all(line["completed"] == line["total"] for line in last.values())


async def test_pull_streams_byte_progress_and_lands_every_file(redis_server, tmp_path, hub, model_dir):
    # huggingface_hub reports every 10 MiB read: slow enough that the report between the
    # first 10 MiB and the end of a 12.6 MB shard is seen (~0.4 s).
    hub.bytes_per_s = 5e6
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        lines = await pull(http, REPO)
        check_progress(lines, model_dir)
        shard_lines = [line for line in lines if line.get("total") == (model_dir / SHARD).stat().st_size]
        assert any(0 < line["completed"] < line["total"] for line in shard_lines), "no progress within the file"
        assert pulled_files(stack, REPO) == source_files(model_dir)

        [entry] = (await http.get("/api/tags")).json()["models"]
        assert entry["name"] == REPO and entry["size"] == sum(p.stat().st_size for p in model_dir.iterdir())
        assert entry["details"]["family"] == "llama" and entry["details"]["quantization_level"] == "F32"
        shown = (await http.post("/api/show", json={"model": REPO})).json()
        assert shown["model_info"]["llama.context_length"] == 2048
        assert shown["model_info"]["llama.embedding_length"] == 64
        assert "{{" in shown["template"] or "{%" in shown["template"]

        # Again: everything is there, nothing is downloaded, "stream": false answers once.
        gets = hub.count("GET", ".safetensors")
        r = await http.post("/api/pull", json={"model": REPO, "stream": False})
        assert r.status_code == 200 and r.json() == {"status": "success"}
        assert hub.count("GET", ".safetensors") == gets


async def test_success_comes_once_the_model_is_listed(redis_server, tmp_path, hub, monkeypatch):
    """A client told "success" lists and runs the model at once (the official client does),
    so the pull worker must say it only after the catalog has the model, however slow that is."""
    put = catalog.put

    async def slow_put(*args):
        await asyncio.sleep(0.5)
        await put(*args)

    monkeypatch.setattr("workers.pull_worker.catalog.put", slow_put)
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        r = await http.post("/api/pull", json={"model": REPO, "stream": False}, timeout=120)
        assert r.json() == {"status": "success"}
        assert REPO in {m["name"] for m in (await http.get("/api/tags")).json()["models"]}
        r = await http.post("/api/generate", json={"model": REPO, "prompt": "hi", "stream": False})
        assert r.status_code == 200, r.text


async def test_async_pull_job(redis_server, tmp_path, hub, model_dir):
    hub.bytes_per_s = 5e6  # slow enough that polls see it part-way
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        r = await http.post("/api/jobs/pull", json={"model": REPO})
        assert r.status_code == 202
        job = r.json()
        assert job["type"] == "pull" and job["status"] in ("queued", "running") and job["stores"]
        seen: list[dict] = []

        async def done() -> bool:
            seen.append((await http.get(f"/api/jobs/{job['id']}")).json())
            return seen[-1]["status"] in ("done", "failed")

        await async_wait_until(done, 60, "the pull job to finish")
        assert seen[-1]["status"] == "done" and seen[-1]["finished_at"], seen[-1]
        assert seen[-1]["completed"] == seen[-1]["total"] == sum(p.stat().st_size for p in model_dir.iterdir())
        assert any(0 < s["completed"] < s["total"] for s in seen if s["status"] == "running")
        assert REPO in {m["name"] for m in (await http.get("/api/tags")).json()["models"]}
        assert [j["id"] for j in (await http.get("/api/jobs")).json()["jobs"]] == [job["id"]]
        r = await http.delete(f"/api/jobs/{job['id']}")
        assert r.status_code == 409
        lines = ndjson_lines((await http.get(f"/api/jobs/{job['id']}/stream")).text)
        assert lines[-1] == {"status": "success"}


async def test_two_clients_share_one_download(redis_server, tmp_path, hub, model_dir):
    hub.bytes_per_s = 20e6
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        first = asyncio.create_task(pull(http, REPO))
        await asyncio.sleep(0.5)  # the first is downloading by now
        second = await pull(http, REPO)
        check_progress(await first, model_dir)
        assert second[-1] == {"status": "success"}
        assert hub.count("GET", SHARD) == 1, hub.requests
        assert pulled_files(stack, REPO) == source_files(model_dir)


async def test_cut_connection_resumes_where_it_stopped(redis_server, tmp_path, hub, model_dir):
    hub.cut_once(REPO, SHARD, 11 * 2**20)
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        check_progress(await pull(http, REPO), model_dir)
        ranges = [rng for method, path, rng in hub.requests if method == "GET" and path.endswith(SHARD)]
        assert ranges == [None, "bytes=10485760-"]
        assert pulled_files(stack, REPO) == source_files(model_dir)


async def test_pull_errors_say_what_to_do(redis_server, tmp_path, hub):
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        r = await http.post("/api/pull", json={"model": GATED, "stream": False})
        assert r.status_code == 403 and "HF_TOKEN" in r.json()["error"]
        lines = await pull(http, GATED)
        assert lines[0] == {"status": "pulling manifest"} and "HF_TOKEN" in lines[-1]["error"]

        r = await http.post("/api/pull", json={"model": "tiny-org/no-such-model", "stream": False})
        assert r.status_code == 404 and "not found on Hugging Face" in r.json()["error"]

        r = await http.post("/api/pull", json={"model": HUGE, "stream": False})
        assert r.status_code == 507 and "not enough disk space" in r.json()["error"]
        assert "VLLAMA_HOME" in r.json()["error"]

        r = await http.post("/api/pull", json={"model": "nosuchmodel:1b", "stream": False})
        assert r.status_code == 404 and "vllama suggest" in r.json()["error"]
        r = await http.post("/api/pull", json={"model": "../../etc/passwd"})
        assert r.status_code == 400
        r = await http.post("/api/pull", json={})
        assert r.status_code == 400 and r.json() == {"error": "model is required"}
        assert (await http.get("/api/tags")).json() == {"models": []}
        record = json.loads(await stack.redis.get(keys.pull_record(stack.pull_worker.store_id, GATED)))
        assert record["status"] == "failed" and record["code"] == "forbidden"


async def test_pull_without_a_pull_worker_is_503(redis_server, tmp_path):
    async with fake_stack(redis_server.url, home=tmp_path) as stack, stack.client() as http:
        r = await http.post("/api/pull", json={"model": REPO})
        assert r.status_code == 503 and "vllama pull-worker" in r.json()["error"]


async def test_auto_pull_then_load_on_first_request(redis_server, tmp_path, hub, model_dir):
    """With VLLAMA_AUTO_PULL=any, a request for any repo id pulls it (tests/test_pull_safety.py:
    the default allows only aliases)."""
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path, auto_pull="any",
                          max_loaded_models=2) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": REPO, "prompt": "hi", "stream": False})
        assert r.status_code == 200, r.text
        assert pulled_files(stack, REPO) == source_files(model_dir)
        assert REPO in {m["name"] for m in (await http.get("/api/ps")).json()["models"]}


async def test_without_auto_pull_a_model_not_on_disk_is_404(redis_server, tmp_path, hub):
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": REPO, "prompt": "hi"})
        assert r.status_code == 404 and f"ollama pull {REPO}" in r.json()["error"]


async def test_a_client_leaving_does_not_stop_the_pull(redis_server, tmp_path, hub, model_dir):
    hub.bytes_per_s = 20e6
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        async with http.stream("POST", "/api/pull", json={"model": REPO}) as r:
            async for line in r.aiter_lines():
                if '"completed"' in line:
                    break  # gone while the download is under way

        async def finished() -> bool:
            raw = await stack.redis.get(keys.pull_record(stack.pull_worker.store_id, REPO))
            return raw is not None and json.loads(raw)["status"] == "success"

        await async_wait_until(finished, 30, "the pull to finish without its client")
        assert pulled_files(stack, REPO) == source_files(model_dir)
        assert hub.count("GET", SHARD) == 1


async def test_killed_pull_worker_keeps_the_files_it_finished(redis_server, tmp_path, hub, model_dir):
    """A pull worker killed mid-pull (SIGKILL): its client hears so, and the next pull fetches
    only the files that were not complete."""
    hub.bytes_per_s = 8e6  # the shards take ~1.6 s; the small files are done well before
    env = {"VLLAMA_REDIS_URL": redis_server.url, "VLLAMA_HOME": str(tmp_path), "VLLAMA_STORE_ID": "box",
           "VLLAMA_HEARTBEAT_INTERVAL_S": "0.2", "VLLAMA_HEARTBEAT_TTL_S": "1", "HF_ENDPOINT": hub.endpoint,
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": ""}

    def start_puller(n: int) -> Proc:
        return Proc(["pull-worker"], env, tmp_path / f"puller{n}.log")

    async with fake_stack(redis_server.url, home=tmp_path) as stack, stack.client() as http:
        puller = start_puller(1)
        try:
            async def store_up() -> bool:
                return bool(await catalog.live_stores(stack.redis))
            await async_wait_until(store_up, 30, "the pull worker to start")
            first = asyncio.create_task(http.post("/api/pull", json={"model": REPO}, timeout=60))

            async def small_files_done() -> bool:
                # On disk, not just counted: a file's bytes are all read a moment before
                # huggingface_hub moves it into place, and a kill in between loses it.
                raw = await stack.redis.get(keys.pull_record("box", REPO))
                files = json.loads(raw)["files"] if raw else []
                small = [f for f in files if f["total"] < 2**23]
                snapshots = list((tmp_path / "models" / "hub").glob("models--*/snapshots/*"))
                return bool(small) and all(any((s / f["path"]).exists() for s in snapshots) for f in small)
            await async_wait_until(small_files_done, 30, "the small files to arrive")
            puller.kill()
            lines = ndjson_lines((await first).text)
            assert "stopped" in lines[-1]["error"] and "pull again" in lines[-1]["error"]
        finally:
            puller.kill()

        # The killed pull worker's record outlives it by up to its TTL: wait for the new one's
        # (a new token, made at its start), or the pull may find no store in between.
        first_tokens = {s.token for s in await catalog.live_stores(stack.redis)}
        puller = start_puller(2)
        try:
            async def new_store_up() -> bool:
                return any(s.token not in first_tokens for s in await catalog.live_stores(stack.redis))
            await async_wait_until(new_store_up, 30, "the second pull worker to start")
            r = await http.post("/api/pull", json={"model": REPO, "stream": False}, timeout=60)
            assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
        finally:
            puller.stop()
        assert hub.count("GET", "tokenizer.json") == 1
        assert hub.count("GET", SHARD) == 2
        store = ModelStore(tmp_path / "models")
        directory = store.model_dir(store.get(REPO))
        assert {p.name: p.read_bytes() for p in directory.iterdir()} == source_files(model_dir)


async def test_unreachable_hub_is_502_saying_what_to_check(redis_server, tmp_path, monkeypatch):
    isolate_hf_client(monkeypatch, tmp_path / "hf_home")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        r = await http.post("/api/pull", json={"model": REPO, "stream": False}, timeout=120)
        assert r.status_code == 502 and "HF_ENDPOINT" in r.json()["error"], r.text


async def test_cli_pull_shows_progress_bars(redis_server, tmp_path, hub, model_dir):
    hub.bytes_per_s = 20e6
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        code, out = await run_cli(stack.base_url, "pull", REPO)
        assert code == 0, out
        assert "pulling manifest" in out and "success" in out
        assert "pulling " in out and "%|" in out  # a bar per file
        assert REPO in {m["name"] for m in (await http.get("/api/tags")).json()["models"]}
        code, out = await run_cli(stack.base_url, "pull", "no-org/no-model")
        assert code == 1 and "error:" in out


async def test_a_sentence_transformers_repo_keeps_its_pooling_steps(redis_server, tmp_path, monkeypatch):
    """An embedding model's 1_Pooling/config.json says how vLLM pools its vectors: without it
    the vectors would be the wrong ones. The bundled all-minilm, served as a Hub repo."""
    import zipfile

    from common.models import ALIASES
    from workers.pull import bundled_path

    source = tmp_path / "minilm"
    with zipfile.ZipFile(bundled_path(ALIASES["all-minilm:latest"].bundled)) as zf:
        zf.extractall(source)
    (source / "onnx").mkdir()
    (source / "onnx" / "model.onnx").write_bytes(b"not wanted")
    isolate_hf_client(monkeypatch, tmp_path / "hf_home")
    with HubStandin() as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        standin.add_repo("sentence-transformers/minilm", source)
        async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path / "home") as stack, \
                stack.client() as http:
            assert (await pull(http, "sentence-transformers/minilm"))[-1] == {"status": "success"}
            store = stack.pull_worker.store
            manifest = store.get("sentence-transformers/minilm")
            directory = store.model_dir(manifest)
            assert (directory / "1_Pooling" / "config.json").read_bytes() == \
                (source / "1_Pooling" / "config.json").read_bytes()
            assert not (directory / "onnx").exists()
            assert manifest.description.capabilities == ["embedding"]


async def test_a_pull_worker_starting_while_redis_restarts_waits_for_it(redis_server, tmp_path, monkeypatch):
    """Its first write of the store's catalog meets a dropped connection (Redis restarting as
    the process starts): it tries again, instead of the process dying."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from tests.model_factory import write_model
    from workers import pull_worker

    write_model(tmp_path, "stored:one")
    real_reset, failures = pull_worker.catalog.reset, []

    async def reset_failing_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise RedisConnectionError("Error while reading from redis: (104, 'Connection reset by peer')")
        return await real_reset(*args, **kwargs)

    monkeypatch.setattr(pull_worker.catalog, "reset", reset_failing_once)
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        async def listed() -> bool:
            return any(m["name"] == "stored:one" for m in (await http.get("/api/tags")).json()["models"])

        await async_wait_until(listed, 30, "the store's model to be listed")
        assert failures == [1] and not stack.pull_worker._stop.is_set()
