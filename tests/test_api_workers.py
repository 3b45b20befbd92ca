"""`vllama api --workers N` and VLLAMA_API_WORKERS for `vllama serve`: N API processes on one
port, each a full replica (its own Redis connections), all stopped by one signal with exit
status 0, one that dies started again, none outliving its manager.

Which process answered a request is told without asking the product: the test keeps the
connection open once the answer is read and finds which API process holds the server side
of it (its peer is the test's own port). That is also how each process is shown to hold its
own connections to Redis.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket

import psutil
import pytest
import redis

from cli.embedded_redis import free_port
from tests.harness import Proc, ndjson_lines, wait_until

MODEL = "fake:test"
EXPECTED = "tok0 tok1 tok2 "  # the fake engine's answer to num_predict 3


def _api_processes(manager: psutil.Process) -> list[psutil.Process]:
    """The API processes a manager spawned (multiprocessing's own helpers left out)."""
    found = []
    for child in manager.children():
        try:
            if "--multiprocessing-fork" in child.cmdline() and "resource_tracker" not in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def _holds_redis(process: psutil.Process, redis_port: int) -> bool:
    try:
        return any(c.raddr and c.raddr.port == redis_port for c in process.net_connections(kind="tcp"))
    except psutil.NoSuchProcess:
        return False


def _peer_of(processes: list[psutil.Process], local_port: int, peer_port: int) -> int | None:
    """The process holding a TCP connection from ``local_port`` to ``peer_port``."""
    for process in processes:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.laddr and c.raddr and c.laddr.port == local_port and c.raddr.port == peer_port
               for c in connections):
            return process.pid
    return None


def _generate(port: int, processes: list[psutil.Process], stream: bool) -> int | None:
    """One /api/generate over a fresh connection; checks the answer, returns the PID of the
    API process that served it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.connect()
        own_port = conn.sock.getsockname()[1]
        body = {"model": MODEL, "prompt": "hi", "stream": stream, "options": {"num_predict": 3}}
        conn.request("POST", "/api/generate", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read().decode()
        assert response.status == 200, data
        if stream:
            assert response.getheader("Content-Type", "").startswith("application/x-ndjson")
            lines = ndjson_lines(data)
            assert len(lines) > 2 and lines[-1]["done"] is True
            assert "".join(line["response"] for line in lines) == EXPECTED
        else:
            assert json.loads(data)["response"] == EXPECTED
        # The answer is read and the connection kept alive: its server side is still open.
        return _peer_of(processes, port, own_port)
    finally:
        conn.close()


def _answers(port: int, path: str = "/health") -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False


def _start(redis_server, tmp_path, workers: int = 2) -> tuple[Proc, int, psutil.Process]:
    port = free_port()
    api = Proc(["api", "--port", str(port), "--workers", str(workers)],
               {"VLLAMA_REDIS_URL": redis_server.url, "OLLAMA_HOST": ""}, tmp_path / "api.log")
    manager = psutil.Process(api.popen.pid)

    def up() -> bool:
        assert api.alive(), api.log_tail()
        processes = _api_processes(manager)
        return len(processes) == workers and all(_holds_redis(p, redis_server.port) for p in processes) \
            and _answers(port)

    wait_until(up, 60, f"{workers} API processes connected to Redis, and a ready worker")
    return api, port, manager


@pytest.fixture
def fake_worker(redis_server, tmp_path):
    redis.Redis.from_url(redis_server.url).flushdb()  # no workers or jobs of earlier tests
    env = {"VLLAMA_REDIS_URL": redis_server.url, "VLLAMA_MODEL": MODEL, "VLLAMA_ENGINE": "fake"}
    worker = Proc(["worker"], env, tmp_path / "worker.log")
    yield worker
    worker.stop()
    worker.kill_tree()


def test_two_api_processes_share_the_port_restart_and_stop_with_status_0(redis_server, fake_worker, tmp_path):
    api, port, manager = _start(redis_server, tmp_path)
    try:
        # Each is a full replica: _start saw each hold its own connections to Redis.
        processes = _api_processes(manager)
        for process in processes:  # the C event loop and HTTP parser, not asyncio's and h11's
            mapped = " ".join(m.path for m in process.memory_maps())
            assert "/uvloop/" in mapped and "/httptools/" in mapped, f"API process {process.pid} maps {mapped}"
        # Fresh connections, streamed and not, until each process has served both kinds.
        served: dict[int, set[bool]] = {p.pid: set() for p in processes}
        for i in range(200):
            pid = _generate(port, processes, stream=i % 2 == 0)
            assert pid in served, f"no API process holds the connection (found {pid})"
            served[pid].add(i % 2 == 0)
            if all(kinds == {True, False} for kinds in served.values()):
                break
        assert all(kinds == {True, False} for kinds in served.values()), \
            f"after {i + 1} requests, what each process served (stream or not): {served}"

        # One killed: the manager starts another in its place, and both serve.
        victim = processes[0]
        victim.kill()
        wait_until(lambda: victim.pid not in {p.pid for p in _api_processes(manager)}
                   and len(_api_processes(manager)) == 2 and _answers(port), 60, "a new API process")
        assert api.alive()
        processes = _api_processes(manager)
        for i in range(4):
            assert _generate(port, processes, stream=i % 2 == 0) in {p.pid for p in processes}

        api.popen.send_signal(signal.SIGTERM)
        assert api.popen.wait(30) == 0, api.log_tail()
        _, alive = psutil.wait_procs(processes, timeout=15)
        assert not alive, f"API processes left running: {[p.pid for p in alive]}"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert "Traceback" not in api.log_path.read_text(), api.log_tail(80)
    finally:
        api.stop()
        api.kill_tree()


def test_api_processes_end_with_their_manager_killed_outright(redis_server, fake_worker, tmp_path):
    api, port, manager = _start(redis_server, tmp_path)
    try:
        processes = _api_processes(manager)
        api.kill()  # SIGKILL: the manager runs no clean-up
        _, alive = psutil.wait_procs(processes, timeout=15)
        assert not alive, f"API processes outlived their manager: {[p.pid for p in alive]}"
    finally:
        api.stop()
        api.kill_tree()


def test_api_processes_that_cannot_start_stop_the_command_with_status_1(redis_server, tmp_path):
    # The command itself accepts the setting; the app, built in each process, refuses it.
    api = Proc(["api", "--port", str(free_port()), "--workers", "2"],
               {"VLLAMA_REDIS_URL": redis_server.url, "OLLAMA_HOST": "", "VLLAMA_ORIGINS": "example.com"},
               tmp_path / "api.log")
    try:
        assert api.popen.wait(60) == 1, api.log_tail()
        log = api.log_path.read_text()
        assert "is not an origin" in log and "an API process could not start" in log, api.log_tail()
    finally:
        api.stop()
        api.kill_tree()


def test_serve_with_two_api_processes_answers_and_stops_with_status_0(tmp_path):
    port = free_port()
    env = {"VLLAMA_ENGINE": "fake", "VLLAMA_HOME": str(tmp_path), "VLLAMA_REDIS_URL": "", "OLLAMA_HOST": "",
           "VLLAMA_API_WORKERS": "2"}
    serve = Proc(["serve", "--port", str(port), "--model", MODEL], env, tmp_path / "serve.log")
    manager = psutil.Process(serve.popen.pid)
    try:
        def up() -> bool:
            assert serve.alive(), serve.log_tail()
            return len(_api_processes(manager)) == 2 and _answers(port)

        wait_until(up, 90, "vllama serve with two API processes to be healthy")
        processes = _api_processes(manager)
        # They reached serve's private Redis, whose URL serve made up after it started.
        assert _generate(port, processes, stream=True) in {p.pid for p in processes}
        assert _generate(port, processes, stream=False) in {p.pid for p in processes}

        everything = manager.children(recursive=True)
        serve.popen.send_signal(signal.SIGTERM)
        assert serve.popen.wait(60) == 0, serve.log_tail()
        _, alive = psutil.wait_procs(everything, timeout=15)
        assert not alive, f"left running: {[' '.join(p.cmdline()) for p in alive]}"
    finally:
        serve.stop()
        serve.kill_tree()


def _get(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # a fresh connection: any process
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
        return body
    finally:
        conn.close()


def _version_requests(metrics_text: str) -> int:
    wanted = 'vllama_http_requests_total{method="GET",endpoint="/api/version",status="200"} '
    return sum(int(float(line[len(wanted):])) for line in metrics_text.splitlines() if line.startswith(wanted))


def test_metrics_count_the_requests_of_every_api_process(redis_server, fake_worker, tmp_path):
    """A scrape reaches one of the N processes at random; each must show the requests all of
    them answered, not its own share."""
    api, port, _ = _start(redis_server, tmp_path)
    try:
        # Which process accepts a connection is the kernel's choice: on a busy machine one can
        # take a long run of them. Ask until each has answered some (as each wrote to Redis).
        client = redis.Redis.from_url(redis_server.url)
        sent = 0

        def version_shares() -> list[int]:
            return [sum(n for method, endpoint, status, n in json.loads(raw)["requests"]
                        if endpoint == "/api/version")
                    for key in client.keys("vllama:api-http-counts:*") for raw in client.hgetall(key).values()]

        def each_process_answered_some() -> bool:
            nonlocal sent
            for _ in range(10):
                _get(port, "/api/version")
                sent += 1
            shares = version_shares()
            return len(shares) == 2 and min(shares) > 0

        wait_until(each_process_answered_some, 60, "each API process to answer some requests", interval_s=0.5)
        wait_until(lambda: all(_version_requests(_get(port, "/metrics")) == sent for _ in range(6)), 30,
                   f"every scrape to count the {sent} requests")
        # None of them had them all of its own: the scrapes summed the shares.
        shares = wait_until(lambda: (s := version_shares()) and sum(s) == sent and s, 30,
                            "each process to publish its latest counts")
        assert len(shares) == 2 and 0 < min(shares) and max(shares) < sent, shares
    finally:
        api.stop()
        api.kill_tree()


@pytest.mark.parametrize(("setting", "logged"), [(None, True), ("0", False)])
def test_the_access_log_is_on_unless_turned_off(redis_server, tmp_path, setting, logged):
    port = free_port()
    env = {"VLLAMA_REDIS_URL": redis_server.url, "OLLAMA_HOST": ""}
    if setting is not None:
        env["VLLAMA_ACCESS_LOG"] = setting
    api = Proc(["api", "--port", str(port)], env, tmp_path / "api.log")
    try:
        wait_until(lambda: _answers(port, "/api/version"), 60, "the API to answer")
        api.stop()
        log = api.log_path.read_text()
        assert "Application startup complete" in log  # the API's other lines stay either way
        assert ('"GET /api/version HTTP/1.1" 200' in log) == logged, log[-2000:]
    finally:
        api.stop()
        api.kill_tree()
