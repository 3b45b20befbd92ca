"""`vllama serve`: one command starts Redis, the API and a worker, and one Ctrl-C (or a
SIGTERM from a process manager) stops all of them. The fake engine keeps this quick; the
e2e tests run the same processes with vLLM."""

from __future__ import annotations

import signal

import httpx
import psutil
import pytest

from cli.embedded_redis import free_port
from tests.harness import Proc, wait_until


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_serve_starts_everything_and_one_signal_stops_everything(tmp_path, stop_signal):
    port = free_port()
    env = {"VLLAMA_ENGINE": "fake", "VLLAMA_HOME": str(tmp_path), "VLLAMA_REDIS_URL": "", "OLLAMA_HOST": ""}
    serve = Proc(["serve", "--port", str(port), "--model", "fake:serve"], env, tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert serve.alive(), serve.log_tail()
            try:
                return httpx.get(base + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 60, "vllama serve to be healthy")
        r = httpx.post(base + "/api/generate", timeout=30,
                       json={"model": "fake:serve", "prompt": "hi", "stream": False, "options": {"num_predict": 3}})
        assert r.status_code == 200 and r.json()["response"] == "tok0 tok1 tok2 "

        children = psutil.Process(serve.popen.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names and "worker" in names

        serve.popen.send_signal(stop_signal)
        assert serve.popen.wait(60) is not None
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"left running: {[' '.join(p.cmdline()) for p in alive]}"
    finally:
        serve.kill_tree()


def test_serve_stops_and_says_why_when_its_worker_cannot_start(tmp_path):
    port = free_port()
    env = {"VLLAMA_HOME": str(tmp_path), "VLLAMA_REDIS_URL": "", "OLLAMA_HOST": ""}
    serve = Proc(["serve", "--port", str(port), "--model", "no-such-model:1b"], env, tmp_path / "serve.log")
    try:
        assert serve.popen.wait(120) != 0
        log = serve.log_path.read_text()
        assert "model 'no-such-model:1b' not found" in log
        assert "Traceback" not in log
    finally:
        serve.kill_tree()
