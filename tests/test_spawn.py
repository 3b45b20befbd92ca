"""cli/spawn.py: a child dies with the process that started it, not with the thread that
asked for it (serve's supervisor restarts parts from a thread that ends before they do)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import psutil

from cli.spawn import popen
from tests.harness import wait_until


def test_a_child_started_from_a_thread_that_has_ended_lives_on():
    started: list[subprocess.Popen] = []
    thread = threading.Thread(target=lambda: started.append(popen(["sleep", "60"])))
    thread.start()
    thread.join()
    [child] = started
    try:
        time.sleep(0.5)
        assert child.poll() is None, "the child died with the thread that asked for it"
    finally:
        child.kill()
        child.wait()


def test_a_child_ends_when_its_parent_is_killed(tmp_path):
    pid_file = tmp_path / "child"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import signal, threading, time
        from cli.spawn import popen
        def start():
            child = popen(["sleep", "60"])
            open({str(pid_file)!r}, "w").write(str(child.pid))
        threading.Thread(target=start).start()
        time.sleep(60)
    """)])
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), 20, "the child to start")
        child = psutil.Process(int(pid_file.read_text()))
        assert child.ppid() == parent.pid
        parent.kill()
        parent.wait()

        def gone() -> bool:
            try:
                return child.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_until(gone, 5, "the child to end with its parent")
    finally:
        parent.kill()
        parent.wait()
