"""`vllama serve`: one command starts Redis, the API and a worker, and one Ctrl-C (or a
SIGTERM from a process manager) stops all of them; a part that dies after it served is started
again, one that cannot start stops serve. The fake engine keeps this quick; the e2e tests run
the same processes with vLLM."""

from __future__ import annotations

import signal

import httpx
import psutil
import pytest
import redis

from cli.embedded_redis import EmbeddedRedis, free_port
from common import keys
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


def _part(serve: Proc, command: str) -> psutil.Process:
    """serve's child running `vllama <command>`."""
    def found() -> psutil.Process | None:
        assert serve.alive(), serve.log_tail()
        for child in psutil.Process(serve.popen.pid).children():
            try:
                if child.cmdline()[-1:] == [command]:
                    return child
            except psutil.NoSuchProcess:
                pass
        return None

    return wait_until(found, 60, f"serve's {command}")


def test_serve_restarts_a_killed_worker_and_pull_worker_and_the_api_answers_meanwhile(tmp_path):
    from tests.model_factory import write_model

    write_model(tmp_path, "fake:listed")
    port = free_port()
    env = {"VLLAMA_ENGINE": "fake", "VLLAMA_HOME": str(tmp_path), "VLLAMA_REDIS_URL": "", "OLLAMA_HOST": ""}
    serve = Proc(["serve", "--port", str(port), "--model", "fake:serve"], env, tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, timeout=10)

    def health() -> int | None:
        assert serve.alive(), serve.log_tail()
        try:
            return http.get("/health").status_code
        except httpx.HTTPError:
            return None

    def listed() -> bool:
        assert serve.alive(), serve.log_tail()
        return "fake:listed" in {m["name"] for m in http.get("/api/tags").json()["models"]}

    def generate() -> None:
        r = http.post("/api/generate", timeout=30,
                      json={"model": "fake:serve", "prompt": "hi", "stream": False, "options": {"num_predict": 3}})
        assert r.status_code == 200 and r.json()["response"] == "tok0 tok1 tok2 ", r.text

    try:
        wait_until(lambda: health() == 200, 60, "vllama serve to be healthy")
        wait_until(listed, 30, "the pull worker to list the model on disk")
        generate()

        # The generation worker: killed, noticed (503), started again (200), serving.
        worker = _part(serve, "worker")
        worker.send_signal(signal.SIGKILL)
        wait_until(lambda: health() == 503, 10, "/health to say no worker is ready", interval_s=0.05)
        assert http.get("/").status_code == 200
        wait_until(lambda: health() == 200, 60, "the worker to be started again")
        assert _part(serve, "worker").pid != worker.pid
        generate()
        assert f"the worker (pid {worker.pid}) was killed by SIGKILL after serving" in serve.log_path.read_text()

        # The pull worker: killed, started again, and the models on disk are listed again.
        puller = _part(serve, "pull-worker")
        puller.send_signal(signal.SIGKILL)
        wait_until(lambda: "the pull worker (pid" in serve.log_path.read_text(), 10, "serve to notice")
        assert http.get("/").status_code == 200
        new_puller = _part(serve, "pull-worker")
        assert new_puller.pid != puller.pid
        wait_until(listed, 60, "the new pull worker to list the model on disk")
        wait_until(lambda: f"the pull worker is serving again (pid {new_puller.pid})" in serve.log_path.read_text(),
                   10, "serve to see the new pull worker ready")
        generate()

        # Still one server: one signal stops it, restarted parts included, and it exits 0.
        children = psutil.Process(serve.popen.pid).children(recursive=True)
        serve.popen.send_signal(signal.SIGTERM)
        assert serve.popen.wait(60) == 0, serve.log_tail()
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"left running: {[' '.join(p.cmdline()) for p in alive]}"

        # Its private Redis kept its data in VLLAMA_HOME/redis: the answers are there.
        redis_again = EmbeddedRedis(data_dir=tmp_path / "redis", appendfsync="everysec").start()
        try:
            client = redis.Redis.from_url(redis_again.url)
            assert len(list(client.scan_iter(keys.job_record("*")))) == 3
            client.close()
        finally:
            redis_again.stop()
    finally:
        http.close()
        serve.kill_tree()


def test_serve_stops_and_says_why_when_its_private_redis_dies(tmp_path):
    port = free_port()
    env = {"VLLAMA_ENGINE": "fake", "VLLAMA_HOME": str(tmp_path), "VLLAMA_REDIS_URL": "", "OLLAMA_HOST": ""}
    serve = Proc(["serve", "--port", str(port), "--model", "fake:serve"], env, tmp_path / "serve.log")
    try:
        def healthy() -> bool:
            assert serve.alive(), serve.log_tail()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 60, "vllama serve to be healthy")
        [redis_server] = [c for c in psutil.Process(serve.popen.pid).children() if "redis-server" in c.name()]
        redis_server.send_signal(signal.SIGKILL)
        assert serve.popen.wait(90) == 1
        assert "its private Redis exited" in serve.log_tail(5)
    finally:
        serve.kill_tree()
