"""What happens when things go wrong, with real vLLM: disconnects, a killed worker, a full
queue. Kept in one module, run after the others, because it adds and removes workers."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import psutil
import pytest

from common.errors import SERVER_BUSY_MESSAGE
from tests.e2e.conftest import MODEL, WORKER_MAX_JOBS, start_worker, wait_ready
from tests.harness import start_api, wait_until

pytestmark = pytest.mark.e2e


def _engine_idle(stack) -> bool:
    return all(w["engine_requests"] == 0 and w["running"] == 0 for w in stack.workers())


def _streams_until_one_runs_on(stack, http: httpx.Client, body: dict, worker_id: str) -> list:
    """Open streaming requests until one is running on ``worker_id`` (arq decides where);
    each is (its context manager, its lines), first line read."""
    streams = []
    for _ in range(12):
        cm = http.stream("POST", "/api/generate", json=body)
        lines = cm.__enter__().iter_lines()
        assert "response" in json.loads(next(lines))
        streams.append((cm, lines))
        if any(j["worker_id"] == worker_id and j["status"] == "running" for j in stack.job_records()):
            return streams
    pytest.fail("no job ran on the second worker")


def test_client_disconnect_aborts_the_vllm_request(stack):
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        with http.stream("POST", "/api/generate", json={
                "model": MODEL, "prompt": "Write a very long story.", "options": {"num_predict": 2000}}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                assert "response" in json.loads(next(lines))
            [running] = [j for j in stack.job_records() if j["status"] == "running"]
        # Closed after 3 of 2000 tokens: the engine must drop the request within seconds.
        wait_until(lambda: _engine_idle(stack), 10, "vLLM to abort the request")
    wait_until(lambda: any(j["job_id"] == running["job_id"] and j["status"] == "cancelled"
                           for j in stack.job_records()), 5, "the job to be recorded cancelled")


def test_killed_worker_ends_its_stream_with_an_error_and_the_other_worker_serves_on(stack):
    second = start_worker(stack.redis_url, stack.logs / "worker2.log", **stack.env)
    try:
        wait_ready(stack.base_url, second, n_workers=2)
        victim_id = next(w["worker_id"] for w in stack.workers() if w["pid"] == second.popen.pid)
        engine_procs = psutil.Process(second.popen.pid).children(recursive=True)
        assert engine_procs, "vLLM runs its engine core in child processes"
        body = {"model": MODEL, "prompt": "Write a long essay.", "options": {"num_predict": 3000}}
        with httpx.Client(base_url=stack.base_url, timeout=60) as http:
            streams = _streams_until_one_runs_on(stack, http, body, victim_id)
            victim_jobs = {j["job_id"] for j in stack.job_records() if j["worker_id"] == victim_id and j["status"] == "running"}
            second.kill()
            killed_at = time.monotonic()
            # Every stream either finishes (other worker) or ends with an error line (victim).
            errors = 0
            for cm, lines in streams:
                last = None
                for line in lines:
                    last = json.loads(line)
                    if "error" in last:
                        break
                    if time.monotonic() - killed_at > 2 and not last.get("done"):
                        break  # a survivor on the healthy worker: no need to read 3000 tokens
                if last and "error" in last:
                    errors += 1
                    assert "stopped responding" in last["error"]
                    assert time.monotonic() - killed_at < 10
                cm.__exit__(None, None, None)
            assert errors >= 1
        # SIGKILL runs no cleanup in the worker; its vLLM processes must still go away.
        gone, alive = psutil.wait_procs(engine_procs, timeout=10)
        assert not alive, f"orphaned engine processes: {alive}"
        failed = {j["job_id"] for j in stack.job_records() if j["status"] == "failed"}
        assert victim_jobs <= failed
        # The surviving worker still serves.
        r = httpx.post(stack.base_url + "/api/generate", timeout=60,
                       json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 4}})
        assert r.status_code == 200 and r.json()["eval_count"] == 4
    finally:
        second.stop()
    wait_until(lambda: _engine_idle(stack), 15, "the surviving worker to finish aborted work")


def test_killed_engine_process_fails_its_streams_and_its_worker_starts_it_again(stack):
    """The worker lives on but its vLLM engine core dies: its clients get an error line, it
    stops taking jobs at once (the other worker serves), shows the model failed, and starts
    the engine again."""
    second = start_worker(stack.redis_url, stack.logs / "worker-engine.log", **stack.env)
    try:
        wait_ready(stack.base_url, second, n_workers=2)
        victim_id = next(w["worker_id"] for w in stack.workers() if w["pid"] == second.popen.pid)
        engine_procs = psutil.Process(second.popen.pid).children(recursive=True)
        body = {"model": MODEL, "prompt": "Write a long essay.", "options": {"num_predict": 3000}}
        with httpx.Client(base_url=stack.base_url, timeout=60) as http:
            streams = _streams_until_one_runs_on(stack, http, body, victim_id)
            for proc in engine_procs:
                proc.kill()
            killed_at = time.monotonic()
            errors = []
            for cm, lines in streams:
                for line in lines:
                    last = json.loads(line)
                    if "error" in last:
                        errors.append((last["error"], time.monotonic() - killed_at))
                        break
                    if time.monotonic() - killed_at > 3:
                        break  # a stream on the healthy worker goes on; enough of it
                cm.__exit__(None, None, None)
        assert errors and all(seconds < 10 for _, seconds in errors), errors

        def victim_state() -> str:
            [victim] = [w for w in stack.workers() if w["worker_id"] == victim_id]
            return victim["state"]

        wait_until(lambda: victim_state() == "loading", 10, "the worker to say it is starting its engine again")
        # Meanwhile the other worker serves.
        r = httpx.post(stack.base_url + "/api/generate", timeout=120,
                       json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 4}})
        assert r.status_code == 200
        assert r.json()["eval_count"] == 4
        wait_until(lambda: victim_state() == "ready", 300, "the engine to be started again", interval_s=1)
        assert second.alive()
        print(f"\nkilled engine: error lines after {max(s for _, s in errors):.1f} s, engine back after "
              f"{time.monotonic() - killed_at:.0f} s")
    finally:
        second.stop()
    wait_until(lambda: _engine_idle(stack), 15, "the surviving worker to finish aborted work")


def test_full_queue_answers_503_at_once_and_loses_nothing(stack):
    api, base = start_api(stack.redis_url, stack.logs, VLLAMA_MAX_QUEUE="2")
    try:
        wait_until(lambda: _engine_idle(stack), 15, "an idle worker")
        n = WORKER_MAX_JOBS + 2 + 4

        def one(_: int) -> httpx.Response:
            return httpx.post(base + "/api/generate", timeout=120, json={
                "model": MODEL, "prompt": "Tell me about the sea.", "stream": False, "options": {"num_predict": 24}})

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            results = list(pool.map(one, range(n)))
        codes = sorted(r.status_code for r in results)
        assert codes.count(503) >= 4, codes
        assert set(codes) == {200, 503}
        for r in results:
            if r.status_code == 503:
                assert r.json() == {"error": SERVER_BUSY_MESSAGE}
            else:
                assert r.json()["eval_count"] > 0
    finally:
        api.stop()
