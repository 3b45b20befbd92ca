"""Child processes that end when the process that started them ends, however it ends.

`vllama serve` runs redis-server, a worker (holding the GPU) and a pull worker as child
processes. Stopped with a signal it stops them itself, but killed with SIGKILL (the OOM
killer, `kill -9`, a crashed container runtime) it runs no code at all, and without help
they would live on, orphaned: a Redis holding every prompt, a GPU held by nobody's server.

Linux asks the kernel to send a child a signal when its parent dies (PR_SET_PDEATHSIG).
What must stay true for that to mean "when serve dies":
- The kernel sends it when the *thread* that forked the child ends, not the process. A
  child started from a short-lived thread (serve's supervisor restarting a part) would be
  killed when that thread ends. So every child is forked by one thread that lives as long
  as the process: the spawner thread below.
- The parent may die between fork and the prctl call; the child then checks that its parent
  is still the process that forked it, and ends itself if not.
- The setting survives exec (it is cleared only for set-user-id programs), so it covers the
  program the child runs. It does not pass to the child's own children: a worker's engine
  processes watch their parent themselves (cli/parent_watch.py).

Elsewhere than Linux this does nothing more than start the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up here in the parent: the child, between fork and exec, must do
    as little as it can (no library loading)."""
    if not os.uname().sysname == "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


def _die_with(parent: int, death_signal: int) -> Callable[[], None]:
    """The child's first step after fork: the kernel sends ``death_signal`` when the
    spawner thread (so the process) ends; if the parent already ended, end now."""

    def preexec() -> None:
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
        if os.getppid() != parent:  # it died before the prctl call: the signal will never come
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class _Spawner:
    """One daemon thread that runs every Popen of this process and then waits for the next:
    it never ends before the process does."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Callable[[], subprocess.Popen], Future]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def run(self, start: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        if threading.current_thread() is self._thread:
            return start()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="vllama-spawner", daemon=True)
                self._thread.start()
        done: Future[subprocess.Popen] = Future()
        self._requests.put((start, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            start, done = self._requests.get()
            try:
                done.set_result(start())
            except BaseException as exc:  # noqa: BLE001 - the caller raises it (a missing binary, ...)
                done.set_exception(exc)


_spawner = _Spawner()


def popen(argv: list[str], *, death_signal: int = signal.SIGKILL, **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(argv, **kwargs)`` for a child that gets ``death_signal`` when this
    process ends without stopping it. SIGKILL for a worker (its drain would wait for Redis
    and clients that are gone); SIGTERM for redis-server, which flushes its append-only file
    and exits at once."""
    if "preexec_fn" in kwargs:
        raise TypeError("popen() sets preexec_fn itself")
    preexec = _die_with(os.getpid(), int(death_signal))
    return _spawner.run(lambda: subprocess.Popen(argv, preexec_fn=preexec, **kwargs))
