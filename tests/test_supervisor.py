"""serve's supervisor (cli/supervisor.py) with stand-in parts: small Python processes that
register themselves in Redis the way workers do, then live, die or fail as each test says.
test_serve.py checks the same with the real parts."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
import threading
import time
import uuid

import pytest
import redis

from cli.supervisor import STOP_AGAIN_S, Backoff, Part, Registration, StderrTail, Supervisor
from tests.harness import wait_until

# Run n (counted in a file) does what PLAN[n] says: "ready" registers and lives, "ready-die"
# registers then exits 3, "die" exits 4 without registering (after logging why).
STAND_IN = textwrap.dedent("""
    import json, os, socket, sys, time
    import redis
    url, index, counter, plan = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter + ".new", "w").write(str(n + 1))
    os.replace(counter + ".new", counter)
    step = plan[min(n, len(plan) - 1)]
    if step == "die":
        print("2024-01-01 00:00:00,000 ERROR stand.in: cannot start: run", n, file=sys.stderr, flush=True)
        sys.exit(4)
    r = redis.Redis.from_url(url)
    member = f"m{os.getpid()}"
    r.set(f"{index}:{member}", json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    r.zadd(index, {member: 1})
    if step == "ready-die":
        time.sleep(0.5)
        sys.exit(3)
    time.sleep(600)
""")


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_steady_minute():
    backoff = Backoff()
    assert [backoff.delay(None) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(5.0) == 30  # ready, but not for long: still backing off
    assert backoff.delay(61.0) == 1
    assert backoff.delay(0.5) == 2


def test_the_reason_is_the_last_error_the_part_logged(tmp_path):
    log = tmp_path / "err"
    log.write_bytes(b"2024 INFO a: fine\n2024 ERROR workers.main: first\n2024 ERROR workers.main: model 'x' not found\n"
                    b"2024 INFO arq.worker: shutdown\n")
    with open(log, "rb") as f:
        assert StderrTail(f).reason() == "model 'x' not found"
    log.write_bytes(b"Traceback (most recent call last):\n  File x\nValueError: bad value\n")
    with open(log, "rb") as f:
        assert StderrTail(f).reason() == "ValueError: bad value"


class Run:
    """A supervisor of one stand-in part, against the tests' Redis."""

    def __init__(self, redis_url: str, tmp_path, plan: str) -> None:
        self.index = f"test-supervisor:{uuid.uuid4().hex}"
        self.redis = redis.Redis.from_url(redis_url)
        argv = [sys.executable, "-c", STAND_IN, redis_url, self.index, str(tmp_path / "runs"), plan]
        self.part = Part("the stand-in", argv, Registration(self.index, lambda m: f"{self.index}:{m}"))
        self.failed = threading.Event()
        self.supervisor = Supervisor([self.part], {}, redis_url, on_failure=self.failed.set)
        self.runs = tmp_path / "runs"

    def count(self) -> int:
        return int(self.runs.read_text()) if self.runs.exists() else 0

    def registered(self) -> list[dict]:
        return [json.loads(self.redis.get(f"{self.index}:{m.decode()}") or "null")
                for m in self.redis.zrange(self.index, 0, -1)]


@pytest.fixture
def run_factory(redis_server, tmp_path):
    runs = []

    def make(plan: str) -> Run:
        run = Run(redis_server.url, tmp_path, plan)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.supervisor.stop()
        run.redis.close()


def test_a_part_that_served_is_restarted_with_backoff_even_if_a_restart_fails(run_factory, caplog):
    caplog.set_level(logging.INFO, logger="cli.supervisor")
    run = run_factory("ready-die,die,ready")
    run.supervisor.start()
    wait_until(lambda: run.count() == 3 and run.part.member is not None, 30, "the third run to be ready")
    assert not run.failed.is_set() and run.supervisor.failure is None
    # The dead runs' registrations are gone; only the live one is left.
    assert [r["pid"] for r in run.registered()] == [run.part.proc.pid]
    text = caplog.text
    assert "exited with status 3 after serving" in text and "starting it again in 1 s" in text
    assert "exited with status 4 before it was ready again (its last error: cannot start: run 1)" in text
    assert "starting it again in 2 s" in text
    assert "the stand-in is serving again" in text


def test_a_part_that_never_was_ready_stops_everything_and_says_why(run_factory):
    run = run_factory("die")
    run.supervisor.start()
    assert run.failed.wait(30)
    assert run.supervisor.failure == "the stand-in could not start: cannot start: run 0 (it exited with status 4)"
    assert run.count() == 1, "a part that cannot start is not started again"


def test_a_failure_asks_again_to_stop_until_the_stop_begins(run_factory):
    """A stop signal lost while serve's API was starting must not leave serve running."""
    run = run_factory("die")
    asked = []
    run.supervisor._on_failure = lambda: asked.append(time.monotonic())
    run.supervisor.start()
    wait_until(lambda: len(asked) >= 2, 30, "the stop to be asked for twice")
    run.supervisor.stop()
    count = len(asked)
    time.sleep(2 * STOP_AGAIN_S)
    assert len(asked) == count, "asked again after the stop had begun"
