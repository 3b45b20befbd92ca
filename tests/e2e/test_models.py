"""Model management through the real stack and real vLLM, driven by the official `ollama`
client: pull a model from the Hub stand-in with streaming progress, list, show, run it
(loaded on demand by the worker, next to the bundled model), ps, copy, unload, delete."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import ollama
import pytest

from tests.e2e.conftest import MODEL, TINY_REPO
from tests.harness import ROOT, VLLAMA_MODULE, wait_until
from tests.model_factory import gguf_path
from workers.store import ModelStore

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(stack):
    return ollama.Client(host=stack.base_url, timeout=600)


def loaded(client) -> dict[str, ollama.ProcessResponse.Model]:
    return {m.model: m for m in client.ps().models}


def test_bundled_model_is_listed_and_shown(client):
    models = {m.model: m for m in client.list().models}
    assert MODEL in models
    assert models[MODEL].details.family == "llama" and models[MODEL].size > 100e6
    shown = client.show(MODEL)
    assert shown.modelinfo["llama.context_length"] == 8192
    assert 130e6 < shown.modelinfo["general.parameter_count"] < 140e6
    assert "<|im_start|>" in shown.template
    assert "completion" in shown.capabilities and "tools" in shown.capabilities  # its bundled template
    with pytest.raises(ollama.ResponseError) as err:
        client.show("no-such-model:1b")
    assert err.value.status_code == 404


def test_pull_run_ps_copy_unload_delete(client, stack):
    progress = list(client.pull(TINY_REPO, stream=True))
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses and "writing manifest" in statuses
    files = {p.digest: p for p in progress if p.digest}
    assert len(files) >= 6 and all(p.completed == p.total for p in files.values())
    assert TINY_REPO in {m.model for m in client.list().models}
    shown = client.show(TINY_REPO)
    assert shown.modelinfo["llama.embedding_length"] == 64
    assert "tools" not in shown.capabilities  # SmolLM2's own template renders no tools

    # Not loaded yet: the first request has the worker load it, beside the bundled model.
    assert TINY_REPO not in loaded(client)
    r = client.generate(model=TINY_REPO, prompt="Hello", options={"num_predict": 5, "temperature": 0})
    assert r.done and r.eval_count == 5
    ps = loaded(client)
    assert {MODEL, TINY_REPO} <= set(ps)
    assert ps[TINY_REPO].context_length == 2048 and ps[TINY_REPO].size > 20e6
    chat = client.chat(model=TINY_REPO, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 3})
    assert chat.message.role == "assistant" and chat.eval_count == 3

    assert client.copy(TINY_REPO, "tiny-copy").status == "success"
    assert "tiny-copy:latest" in {m.model for m in client.list().models}
    assert client.delete("tiny-copy").status == "success"
    assert "tiny-copy:latest" not in {m.model for m in client.list().models}

    # keep_alive 0 with no prompt unloads at once; the bundled model stays.
    r = client.generate(model=TINY_REPO, keep_alive=0)
    assert r.done_reason == "unload"
    assert TINY_REPO not in loaded(client) and MODEL in loaded(client)

    assert client.delete(TINY_REPO).status == "success"
    assert TINY_REPO not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=TINY_REPO, prompt="Hello")
    assert err.value.status_code == 404


def test_keep_alive_unloads_an_idle_model(client, stack):
    client.pull(TINY_REPO)
    r = client.generate(model=TINY_REPO, prompt="Hi", keep_alive="2s", options={"num_predict": 2})
    assert r.done
    wait_until(lambda: TINY_REPO not in loaded(client), 30, "the idle model to be unloaded after 2 s")
    assert MODEL in loaded(client)
    # Loading with an empty prompt answers done_reason "load".
    assert client.generate(model=TINY_REPO).done_reason == "load"
    assert TINY_REPO in loaded(client)
    httpx.post(stack.base_url + "/api/generate", json={"model": TINY_REPO, "keep_alive": 0}, timeout=60)
    client.delete(TINY_REPO)


def test_create_from_a_local_gguf_file(client, stack):
    """`vllama create` on the bundled GGUF: the same file as smollm2:135m, so the converted
    files are shared, and deleting the new name keeps them."""
    proc = subprocess.run(
        [sys.executable, "-m", VLLAMA_MODULE, "create", "mysmol:q4", "--from", str(gguf_path())],
        env={**os.environ, **stack.env}, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "created mysmol:q4" in proc.stdout
    wait_until(lambda: "mysmol:q4" in {m.model for m in client.list().models}, 15, "the new model to be listed")
    assert client.show("mysmol:q4").modelinfo == client.show(MODEL).modelinfo
    assert client.delete("mysmol:q4").status == "success"
    store = ModelStore(Path(stack.env["VLLAMA_HOME"]) / "models")
    assert store.get("mysmol:q4") is None
    assert (store.model_dir(store.get(MODEL)) / "config.json").exists()

    bad = subprocess.run([sys.executable, "-m", VLLAMA_MODULE, "create", "x", "--from", "/nonexistent.gguf"],
                         env={**os.environ, **stack.env}, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no such file" in bad.stderr


def test_create_from_an_uploaded_gguf_file(client, stack, http):
    """The official client's way to make a model from a file: upload it (create_blob), then
    create from its digest; the store converts it and vLLM runs it, with the system prompt
    the second create gave it."""
    digest = client.create_blob(gguf_path())
    assert http.head(f"/api/blobs/{digest}").status_code == 200
    statuses = [p.status for p in client.create(model="fromblob", files={"model.gguf": digest}, stream=True)]
    assert statuses[0] == "parsing GGUF" and f"using existing layer {digest}" in statuses
    assert statuses[-2:] == ["writing manifest", "success"]
    assert client.create(model="terse", files={"model.gguf": digest}, system="Answer in one word.").status == "success"
    models = {m.model: m for m in client.list().models}
    assert {"fromblob:latest", "terse:latest"} <= set(models)
    assert models["terse:latest"].digest == models["fromblob:latest"].digest  # converted once
    assert client.show("terse").modelinfo == client.show(MODEL).modelinfo
    assert http.post("/api/show", json={"model": "terse"}).json()["system"] == "Answer in one word."

    r = client.generate(model="terse", prompt="What colour is the sky?", options={"num_predict": 5, "temperature": 0})
    assert r.done and r.eval_count and r.response.strip()
    client.generate(model="terse", keep_alive=0)  # unload: the next tests expect the room
    assert client.delete("fromblob").status == "success" and client.delete("terse").status == "success"
