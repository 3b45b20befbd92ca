"""/api/push end to end: the real huggingface_hub client uploads from the real pull worker to the
Hub stand-in (tests/hub_standin.py), with real Redis and real HTTP; the pushed repo is then
pulled back into another store and compared file by file. The official `ollama` client pushes
too. (The generation worker runs the fake engine: nothing here loads a model.)"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import ollama
import pytest

from common.catalog import Manifest
from common.model_info import describe
from tests.fake_stack import fake_stack
from tests.harness import async_wait_until, ndjson_lines
from tests.hub_standin import HubStandin, isolate_hf_client
from tests.model_factory import embedding_bytes, make_tiny_llama
from workers.store import ModelStore, describe_files

pytestmark = pytest.mark.asyncio(loop_scope="session")

TOKEN = "hf_push_token_of_you"  # may write under "you" on the stand-in
OTHERS = "hf_push_token_of_them"  # may write under "them" only
LOCAL = "tiny:1b"  # the model in the store, made here (not pulled)
MINE = "you/tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", max_shard_bytes=embedding_bytes() + 2**20)


@pytest.fixture
def hub(monkeypatch, tmp_path, model_dir):
    """The stand-in, with a repo that belongs to someone else; the pull worker (in this
    process) has the token of "you"."""
    from huggingface_hub import constants

    isolate_hf_client(monkeypatch, tmp_path / "hf_home")
    with HubStandin() as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        # As when HF_ENDPOINT is set before huggingface_hub is imported (as it is for a pull
        # worker): create_repo builds the URL of a repo that exists already from these, not
        # from the endpoint it was given.
        monkeypatch.setattr(constants, "ENDPOINT", standin.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            standin.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        standin.add_writer(TOKEN, "you")
        standin.add_writer(OTHERS, "them")
        standin.add_repo("tiny-org/tiny-llama", model_dir)
        yield standin


def store_model(home: Path, name: str, source: Path) -> Manifest:
    """``source`` as a model made on this machine (as an imported GGUF is): its files in the
    store under ``home``, and its manifest."""
    store = ModelStore(home / "models")
    target = store.local / "tiny"
    shutil.copytree(source, target)
    files = describe_files(target)
    manifest = Manifest(name=name, path=str(target.relative_to(store.root)), files=files,
                        size=sum(f.size for f in files), digest=Manifest.digest_of(files),
                        modified_at=time.time(), description=describe(target))
    store.save(manifest)
    return manifest


def sha256s(files: dict[str, bytes]) -> dict[str, str]:
    return {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}


def source_files(model_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(model_dir).as_posix(): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}


def store_stack(redis_url: str, home: Path, **overrides):
    return fake_stack(redis_url, pull_worker=True, home=home, **overrides)


async def catalogued(http, name: str) -> None:
    async def listed() -> bool:
        return name in {m["name"] for m in (await http.get("/api/tags")).json()["models"]}
    await async_wait_until(listed, 10, f"{name} in the catalog")


def check_push_lines(lines: list[dict], model_dir: Path) -> None:
    """Ollama's sequence: retrieving manifest, then per file "pushing <digest>" lines from 0 to
    its size, then pushing manifest and success."""
    statuses = [line["status"] for line in lines]
    assert statuses[0] == "retrieving manifest"
    assert statuses[-2:] == ["pushing manifest", "success"]
    progress = lines[1:-2]
    assert progress and all("digest" in line for line in progress), statuses
    seen: dict[str, list[int]] = {}
    for line in progress:
        assert line["status"] == f"pushing {line['digest'][7:19]}"
        assert line["digest"].startswith("sha256:") and len(line["digest"]) == 71
        assert 0 <= line["completed"] <= line["total"]
        seen.setdefault(line["digest"], []).append(line["completed"])
    expected = {f"sha256:{hashlib.sha256(p.read_bytes()).hexdigest()}": p.stat().st_size
                for p in model_dir.rglob("*") if p.is_file()}
    assert set(seen) == set(expected)
    for digest, completed in seen.items():
        assert completed[0] == 0 and completed[-1] == expected[digest], (digest, completed)
        assert completed == sorted(completed), "progress went backwards"


async def test_a_pushed_model_pulls_back_byte_identical(redis_server, tmp_path, hub, model_dir):
    """A model made here with /api/create (a system prompt, options) is pushed streaming; the
    repo holds its files unchanged, and another store pulls them back; what /api/create added
    stays behind."""
    store_model(tmp_path / "one", LOCAL, model_dir)
    hub.bytes_per_s = 20e6  # the shards take ~0.6 s each: progress within them shows
    async with store_stack(redis_server.url, tmp_path / "one") as stack, stack.client() as http:
        await catalogued(http, LOCAL)
        r = await http.post("/api/create", json={"model": MINE, "from": LOCAL, "system": "You are tiny.",
                                                 "parameters": {"temperature": 0.2}, "stream": False})
        assert r.status_code == 200, r.text
        r = await http.post("/api/push", json={"model": MINE, "insecure": True}, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson", r.text
        lines = ndjson_lines(r.text)
        check_push_lines(lines, model_dir)
        shard = (model_dir / "model-00001-of-00002.safetensors").stat().st_size
        assert any(0 < line["completed"] < shard for line in lines if line.get("total") == shard), lines
    assert hub.files(MINE) == source_files(model_dir)
    # The token of the pull worker's environment went with every upload request.
    assert hub.count("POST", "/api/repos/create") == 1 and hub.count("POST", f"/api/models/{MINE}/commit/main") == 1
    assert hub.count("PUT", "") >= 2  # the shards (and tokenizer.json) went through LFS

    async with store_stack(redis_server.url, tmp_path / "two", store_id="second") as stack, stack.client() as http:
        r = await http.post("/api/pull", json={"model": MINE, "stream": False}, timeout=120)
        assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
        store = stack.pull_worker.store
        pulled = store.model_dir(store.get(MINE))
        assert sha256s(source_files(pulled)) == sha256s(source_files(model_dir))
        shown = (await http.post("/api/show", json={"model": MINE})).json()
        assert "system" not in shown and "temperature" not in (shown.get("parameters") or "")


async def test_push_a_tag_to_its_branch_with_stream_false_and_the_ollama_client(redis_server, tmp_path, hub,
                                                                                  model_dir):
    store_model(tmp_path, "you/tiny:v1", model_dir)
    async with store_stack(redis_server.url, tmp_path) as stack, stack.client() as http:
        await catalogued(http, "you/tiny:v1")
        r = await http.post("/api/push", json={"model": "you/tiny:v1", "stream": False}, timeout=120)
        assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
        assert hub.files(MINE, "v1") == source_files(model_dir)
        assert hub.files(MINE, "main") == {}  # made empty with the repo: the tag went to its branch

        client = ollama.AsyncClient(host=stack.base_url, timeout=120)
        await client.copy("you/tiny:v1", "you/tiny")
        assert (await client.push("you/tiny")).status == "success"
        assert hub.files(MINE) == source_files(model_dir)
        # Again, streaming: every file is there already, so nothing goes up but a commit.
        puts = hub.count("PUT", "")
        progress = [p async for p in await client.push("you/tiny", stream=True)]
        assert [p.status for p in progress][0] == "retrieving manifest"
        assert [p.status for p in progress][-2:] == ["pushing manifest", "success"]
        assert all(p.completed == p.total for p in progress if p.digest and p.completed)
        assert hub.count("PUT", "") == puts


async def test_push_errors_say_what_to_do(redis_server, tmp_path, hub, model_dir, monkeypatch):
    store_model(tmp_path, "tiny-org/tiny-llama", model_dir)
    async with store_stack(redis_server.url, tmp_path) as stack, stack.client() as http:
        await catalogued(http, "tiny-org/tiny-llama")
        await http.post("/api/copy", json={"source": "tiny-org/tiny-llama", "destination": "mymodel"})
        await http.post("/api/copy", json={"source": "tiny-org/tiny-llama", "destination": MINE})

        r = await http.post("/api/push", json={"model": "mymodel"})
        assert r.status_code == 400 and r.json()["error"] == (
            '"mymodel" cannot be pushed: push to a Hugging Face repository named like "you/mymodel"; '
            "copy it first with ollama cp mymodel you/mymodel")
        r = await http.post("/api/push", json={})
        assert r.status_code == 400 and r.json() == {"error": "model is required"}
        r = await http.post("/api/push", json={"model": "you/nothing"})
        assert r.status_code == 404 and r.json() == {"error": "model 'you/nothing' not found"}

        # Someone else's repo: the Hub lets the repo be (it exists) but refuses the upload, once
        # the push is under way: an in-band error when streaming, its status when not.
        r = await http.post("/api/push", json={"model": "tiny-org/tiny-llama"}, timeout=60)
        lines = ndjson_lines(r.text)
        assert r.status_code == 200 and lines[0] == {"status": "retrieving manifest"}
        assert "Hugging Face refused the push to tiny-org/tiny-llama" in lines[-1]["error"]
        assert "HF_TOKEN" in lines[-1]["error"] and "ollama cp" in lines[-1]["error"]
        r = await http.post("/api/push", json={"model": "tiny-org/tiny-llama", "stream": False}, timeout=60)
        assert r.status_code == 403 and "write access to tiny-org" in r.json()["error"]

        # A token of another namespace: the Hub refuses to make the repo, before any line.
        monkeypatch.setenv("HF_TOKEN", OTHERS)
        for stream in (True, False):
            r = await http.post("/api/push", json={"model": MINE, "stream": stream}, timeout=60)
            assert r.status_code == 403, r.text
            error = r.json()["error"]
            assert 'rights to create a model under the namespace "you"' in error and "HF_TOKEN" in error
        assert hub.count("PUT", "") == 0

        monkeypatch.delenv("HF_TOKEN")
        for stream in (True, False):
            r = await http.post("/api/push", json={"model": MINE, "stream": stream}, timeout=60)
            assert r.status_code == 403, r.text
            assert "set HF_TOKEN" in r.json()["error"] and "pull workers" in r.json()["error"]
        with pytest.raises(ollama.ResponseError) as err:
            await ollama.AsyncClient(host=stack.base_url).push(MINE)
        assert err.value.status_code == 403 and "HF_TOKEN" in err.value.error


async def test_push_without_a_store_holding_it_is_404(redis_server, tmp_path, hub):
    async with fake_stack(redis_server.url, home=tmp_path) as stack, stack.client() as http:
        r = await http.post("/api/push", json={"model": MINE})
        assert r.status_code == 404 and r.json() == {"error": f"model '{MINE}' not found"}
