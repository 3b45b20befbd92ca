"""`vllama serve`: one command starts Redis, the API and a worker, and one Ctrl-C (or a
SIGTERM from a process manager) stops all of them; a part that dies after it served is started
again, one that cannot start stops serve. The fake engine keeps this quick; the e2e tests run
the same processes with vLLM."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

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

        # Its private Redis kept its data in VLLAMA_HOME/redis: the store's catalog is there
        # (the answers' records are not: a streamed answer's record lives a minute).
        redis_again = EmbeddedRedis(data_dir=tmp_path / "redis", appendfsync="everysec").start()
        try:
            client = redis.Redis.from_url(redis_again.url)
            catalogs = list(client.scan_iter(keys.catalog("*")))
            assert any(client.hexists(c, "fake:listed") for c in catalogs), catalogs
            client.close()
        finally:
            redis_again.stop()
    finally:
        http.close()
        serve.kill_tree()


# ------------------------------------------------------------------ nothing outlives serve

def _tree(pid: int) -> list[psutil.Process]:
    """Every descendant of ``pid``, through the children of each of its threads (a child's
    parent is the thread that started it)."""
    found: list[psutil.Process] = []
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                try:
                    found.append(psutil.Process(child))
                except psutil.NoSuchProcess:
                    continue
                todo.append(child)
    return found


def _gone(procs: list[psutil.Process]) -> bool:
    """None of them runs any more (a zombie that no one has reaped yet has ended)."""
    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return not any(running(p) for p in procs)


def _described(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())} ({p.status()})")
        except psutil.NoSuchProcess:
            pass
    return out


def _serve(tmp_path) -> tuple[Proc, httpx.Client]:
    port = free_port()
    env = {"VLLAMA_ENGINE": "fake", "VLLAMA_HOME": str(tmp_path), "VLLAMA_REDIS_URL": "", "OLLAMA_HOST": ""}
    serve = Proc(["serve", "--port", str(port), "--model", "fake:serve"], env, tmp_path / "serve.log")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def healthy() -> bool:
        assert serve.alive(), serve.log_tail()
        try:
            return http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 60, "vllama serve to be healthy")
    return serve, http


def test_serve_killed_outright_takes_redis_and_its_workers_with_it(tmp_path):
    serve, http = _serve(tmp_path)
    try:
        _part(serve, "worker"), _part(serve, "pull-worker")
        tree = _tree(serve.popen.pid)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "redis-server" in names and "worker" in names and "pull-worker" in names, names
        password = (tmp_path / "redis" / "redis-password").read_text().strip()
        assert password not in serve.log_path.read_text()  # its URL is logged without it

        serve.popen.send_signal(signal.SIGKILL)
        serve.popen.wait(10)
        killed = time.monotonic()
        wait_until(lambda: _gone(tree), 15, f"serve's processes to end: {_described(tree)}")
        print(f"\nserve SIGKILLed: its {len(tree)} processes gone after {time.monotonic() - killed:.1f} s")
    finally:
        http.close()
        serve.kill_tree()


def test_a_second_ctrl_c_while_the_worker_drains_stops_everything_at_once(tmp_path):
    serve, http = _serve(tmp_path)
    try:
        # An async job of 15 s (the fake engine: 100 tokens a second): the worker's drain waits for it.
        r = http.post("/api/jobs/generate", json={"model": "fake:serve", "prompt": "hi",
                                                  "options": {"num_predict": 1500}})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        wait_until(lambda: http.get(f"/api/jobs/{job}").json()["status"] == "running", 30, "the job to run")
        tree = _tree(serve.popen.pid)

        serve.popen.send_signal(signal.SIGINT)
        wait_until(lambda: "draining" in serve.log_path.read_text(), 30, "the worker to drain")
        time.sleep(0.5)
        assert serve.alive(), "one Ctrl-C lets the running job finish"
        serve.popen.send_signal(signal.SIGINT)
        second = time.monotonic()
        assert serve.popen.wait(15) == 0, serve.log_tail()
        wait_until(lambda: _gone(tree), 10, f"serve's processes to end: {_described(tree)}")
        print(f"\nsecond Ctrl-C: everything stopped after {time.monotonic() - second:.1f} s")
        log = serve.log_path.read_text()
        assert "stopping at once" in log and "Traceback" not in log, serve.log_tail()
    finally:
        http.close()
        serve.kill_tree()


def _redis_of(serve: Proc) -> psutil.Process:
    def found() -> psutil.Process | None:
        assert serve.alive(), serve.log_tail()
        return next((c for c in psutil.Process(serve.popen.pid).children() if "redis-server" in c.name()), None)

    return wait_until(found, 30, "serve's redis-server")


def test_serve_starts_its_private_redis_again_when_it_dies_and_stops_when_it_cannot(tmp_path):
    serve, http = _serve(tmp_path)
    try:
        r = http.post("/api/jobs/generate", json={"model": "fake:serve", "prompt": "hi",
                                                  "options": {"num_predict": 3}})
        job = r.json()["id"]
        wait_until(lambda: http.get(f"/api/jobs/{job}").json()["status"] == "done", 30, "the async job")
        time.sleep(1.5)  # past the append-only file's fsync (everysec)

        first = _redis_of(serve)
        [port] = [c.laddr.port for c in first.net_connections("inet") if c.status == "LISTEN"]
        first.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: _redis_of(serve).pid != first.pid, 30, "a new redis-server")

        def serves() -> bool:
            assert serve.alive(), serve.log_tail()
            try:
                r = http.post("/api/generate", json={"model": "fake:serve", "prompt": "hi", "stream": False,
                                                     "options": {"num_predict": 3}})
                return r.status_code == 200 and r.json()["response"] == "tok0 tok1 tok2 "
            except httpx.HTTPError:
                return False

        wait_until(serves, 60, "serve to answer again")
        print(f"\nprivate Redis SIGKILLed: serving again after {time.monotonic() - killed:.1f} s")
        log = serve.log_path.read_text()
        assert f"its private Redis (pid {first.pid}) was killed by SIGKILL after serving" in log
        assert "its private Redis is serving again" in log
        # Its data came back from the append-only file: the async job and its answer.
        assert http.get(f"/api/jobs/{job}").json()["output"] == "tok0 tok1 tok2 "

        # Killed again with its port taken meanwhile: it cannot start again, and serve says so.
        second = _redis_of(serve)
        tree = _tree(serve.popen.pid)
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        second.send_signal(signal.SIGKILL)
        wait_until(lambda: _can_bind(squatter, port), 5, "the port to be free")
        squatter.listen()
        try:
            assert serve.popen.wait(60) == 1
        finally:
            squatter.close()
        assert "its private Redis exited and cannot start again" in serve.log_tail(5), serve.log_tail()
        wait_until(lambda: _gone(tree), 10, f"serve's processes to end: {_described(tree)}")
    finally:
        http.close()
        serve.kill_tree()


def _can_bind(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
