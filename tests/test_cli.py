"""The `vllama` command's entry points.

vLLM starts its engine processes with multiprocessing's spawn; a worker killed with SIGKILL
must not leave them running (cli/parent_watch.py). That depends on how the worker was
started, so it is checked here for both ways, `python -m cli worker` and the `vllama`
script, with a stand-in for the worker that spawns one child the way vLLM does (the e2e
tests check the same with vLLM itself).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests.harness import ROOT, VLLAMA_MODULE, wait_until

# Loaded at start by every Python process that has its directory on PYTHONPATH: in the
# process started as `vllama worker` it replaces the worker by one that spawns a child and
# waits; the spawned child (which loads it too) runs child_main.
PROBE = textwrap.dedent("""
    import multiprocessing
    import os
    import sys
    import time
    from pathlib import Path

    OUT = Path(os.environ["VLLAMA_TEST_PROBE_DIR"])


    def child_main():
        (OUT / "child.pid").write_text(str(os.getpid()))
        time.sleep(600)


    def run_worker(settings):
        child = multiprocessing.get_context("spawn").Process(target=child_main)
        child.start()
        (OUT / "parent.pid").write_text(str(os.getpid()))
        time.sleep(600)


    with open("/proc/self/cmdline", "rb") as f:
        spawned = b"--multiprocessing-fork" in f.read()
    if not spawned:
        import workers.main

        workers.main.run_worker = run_worker
""")


def _ended(proc: psutil.Process) -> bool:
    """Gone, or a zombie that nobody has reaped yet (it runs nothing any more)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _entry_points() -> list[tuple[str, list[str]]]:
    script = Path(sys.executable).parent / "vllama"
    return [("python -m", [sys.executable, "-m", VLLAMA_MODULE]), ("script", [str(script)])]


@pytest.mark.parametrize(("how", "command"), _entry_points(), ids=[how for how, _ in _entry_points()])
def test_spawned_children_of_a_killed_worker_exit(tmp_path, how, command):
    if not Path(command[0]).exists():
        pytest.skip(f"{command[0]} is not installed (pip install -e .)")
    (tmp_path / "sitecustomize.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
           "VLLAMA_TEST_PROBE_DIR": str(tmp_path), "VLLAMA_REDIS_URL": "redis://127.0.0.1:1/0"}
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([*command, "worker"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    child_pid = None
    try:
        def started() -> bool:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            return (tmp_path / "child.pid").exists() and (tmp_path / "parent.pid").exists()

        wait_until(started, 60, "the stand-in worker to spawn its child")
        assert int((tmp_path / "parent.pid").read_text()) == worker.pid
        child_pid = int((tmp_path / "child.pid").read_text())
        child = psutil.Process(child_pid)
        assert child.ppid() == worker.pid
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        wait_until(lambda: _ended(child), 15, f"the spawned child to exit after its parent ({how})")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if child_pid is not None and psutil.pid_exists(child_pid):
            os.kill(child_pid, signal.SIGKILL)
        log.close()
