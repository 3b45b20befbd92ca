"""What `vllama serve` does with its child processes: start them, see them become ready,
restart the ones that die after they served, and stop everything when one cannot start.

"Served" is not guessed from time: a part is ready when it has registered itself in Redis
under its own process id, a generation worker with a record in state "ready" (it has loaded
its model), a pull worker with its store record (its catalog is written). A part that dies
before it was ever ready (a model that cannot load, a bad setting) cannot be fixed by
starting it again, so serve stops and says which part and why. One that dies after it was
ready (killed, out of memory, a crash) is started again, after 1 s, then 2, 4, ... up to
30 s while it keeps dying; once it has been ready for a minute the delay is 1 s again. Such
a part that then fails to start again is retried the same way: what stops it (the memory of
the process that died not yet freed, Redis away for a moment) usually passes.

A dead part's registration is removed at once: Redis would keep it until its TTL, and
meanwhile the API would count on a worker that is gone.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from cli.spawn import popen
from common import keys
from common.redis_conn import sync_client

log = logging.getLogger(__name__)

POLL_S = 0.25
STOP_GRACE_S = 45.0  # workers drain running jobs for 30 s when stopped
REDIS_LOST_GRACE_S = 5.0
STOP_AGAIN_S = 2.0  # how often a failure asks again for the stop, until it has begun

# One line of a part's log that says why it failed: "<time> ERROR <logger>: <message>".
_ERROR_LINE = re.compile(rb"\b(?:ERROR|CRITICAL) [\w.]+: (.+)$")
_EXCEPTION_LINE = re.compile(rb"^(\w+(?:Error|Exception)): (.+)$")


@dataclass
class Backoff:
    """Delays between restarts: ``first_s``, doubling up to ``max_s`` while the part keeps
    dying, back to ``first_s`` once it has stayed ready for ``steady_s``."""

    first_s: float = 1.0
    max_s: float = 30.0
    steady_s: float = 60.0
    _next_s: float = 0.0

    def delay(self, ready_for_s: float | None) -> float:
        if not self._next_s or (ready_for_s is not None and ready_for_s >= self.steady_s):
            self._next_s = self.first_s
        delay, self._next_s = self._next_s, min(self._next_s * 2, self.max_s)
        return delay


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class StderrTail:
    """Copies a child's stderr to ours, line by line, keeping its last lines so that serve can
    say why a part failed without the user digging through the log."""

    def __init__(self, stream, lines: int = 200) -> None:
        self._lines: collections.deque[bytes] = collections.deque(maxlen=lines)
        self._thread = threading.Thread(target=self._copy, args=(stream,), name="serve-stderr", daemon=True)
        self._thread.start()

    def _copy(self, stream) -> None:
        out = sys.stderr.buffer
        for line in iter(stream.readline, b""):
            self._lines.append(line.rstrip(b"\r\n"))
            try:
                out.write(line)
                out.flush()
            except (OSError, ValueError):
                pass  # our stderr is gone; keep draining so the child never blocks on it
        stream.close()

    def reason(self, wait_s: float = 2.0) -> str:
        """The last error the part logged (its own words), or ''. Waits a moment for the
        child's last lines, which may still be in the pipe when it has exited."""
        self._thread.join(wait_s)
        for line in reversed(self._lines):
            if m := _ERROR_LINE.search(line):
                return m.group(1).decode(errors="replace").strip()
        for line in reversed(self._lines):
            if m := _EXCEPTION_LINE.match(line):
                return (m.group(1) + b": " + m.group(2)).decode(errors="replace").strip()
        return ""


@dataclass
class Registration:
    """Where a part announces itself in Redis: ``index`` (a zset of ids) and the record of
    each id (JSON with ``pid`` and ``host``); ``ready`` says whether a record means ready."""

    index: str
    record_key: Callable[[str], str]
    ready: Callable[[dict], bool] = lambda record: True

    def find(self, client: redis.Redis, pid: int, host: str) -> str | None:
        """The id under which process ``pid`` of this host is registered and ready."""
        ids = [i.decode() for i in client.zrange(self.index, 0, -1)]
        if not ids:
            return None
        for member, raw in zip(ids, client.mget([self.record_key(i) for i in ids])):
            if raw is None:
                continue
            record = json.loads(raw)
            if record.get("pid") == pid and record.get("host") == host and self.ready(record):
                return member
        return None

    def forget(self, client: redis.Redis, member: str, pid: int) -> None:
        """Remove a dead process's record, unless another process has since taken the id (a
        store's id is the same for every pull worker of the machine)."""
        raw = client.get(self.record_key(member))
        if raw is not None and json.loads(raw).get("pid") == pid:
            client.delete(self.record_key(member))
        client.zrem(self.index, member)


WORKER = Registration(keys.WORKERS, keys.worker_record, lambda record: record.get("state") == "ready")
PULL_WORKER = Registration(keys.STORES, keys.store_record)


@dataclass
class Part:
    """One child process of serve and what is known of it."""

    name: str  # "the worker": how messages name it
    argv: list[str]
    registration: Registration
    backoff: Backoff = field(default_factory=Backoff)
    proc: subprocess.Popen | None = None
    tail: StderrTail | None = None
    member: str | None = None  # its id in Redis, once it was ready
    ready_at: float | None = None  # monotonic time it became ready (this run)
    served: bool = False  # ready at least once, in any run
    restart_at: float | None = None  # when to start it again, after it died

    def start(self, env: dict[str, str]) -> None:
        # Killed with serve if serve is killed: a worker left behind would hold the GPU.
        self.proc = popen(self.argv, env=env, stderr=subprocess.PIPE, death_signal=signal.SIGKILL)
        self.tail = StderrTail(self.proc.stderr)
        self.member = self.ready_at = self.restart_at = None


class Supervisor:
    """Runs the parts from a thread of its own; ``failure`` is set when one could not start
    (or Redis is gone), and ``on_failure`` (serve's way to stop the API) is called once."""

    def __init__(self, parts: list[Part], env: dict[str, str], redis_url: str,
                 on_failure: Callable[[], None], redis_gone: Callable[[], str | None] = lambda: None) -> None:
        self.parts = parts
        self.failure: str | None = None
        self._env = env
        self._host = socket.gethostname()
        self._client = sync_client(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._on_failure = on_failure
        self._redis_gone = redis_gone  # why Redis is gone for good (serve's private one cannot restart), or None
        self._stopping = threading.Event()
        self._killed = False  # kill() was asked for: SIGKILLed parts are no surprise
        self._redis_lost = False  # serve's own Redis is gone for good
        self._thread = threading.Thread(target=self._run, name="serve-supervisor", daemon=True)

    def start(self) -> None:
        for part in self.parts:
            part.start(self._env)
        self._thread.start()

    def stop(self) -> None:
        """Idempotent. No part is started again once this has begun; each gets SIGTERM, and
        SIGKILL if it has not ended within ``STOP_GRACE_S``. A KeyboardInterrupt raised
        meanwhile (serve's second Ctrl-C) leaves the rest to :meth:`kill`."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(10)
        running = self._running()
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        # Without Redis a drain cannot finish anything: the parts get a few seconds, not 45.
        grace_s = REDIS_LOST_GRACE_S if self._redis_lost else STOP_GRACE_S
        for proc in running:
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._client.close()

    def kill(self) -> None:
        """Stop now: SIGKILL every part still running (their engine processes follow within a
        second, cli/parent_watch.py), without waiting for their jobs."""
        self._stopping.set()
        self._killed = True
        if self._thread.is_alive():
            self._thread.join(2)
        running = self._running()
        for proc in running:
            proc.kill()
        for proc in running:
            proc.wait()
        self._client.close()

    def _running(self) -> list[subprocess.Popen]:
        return [p.proc for p in self.parts if p.proc is not None and p.proc.poll() is None]

    def unclean_exits(self) -> list[str]:
        """Parts that did not end cleanly when stopped (killed at the user's second signal
        counts as clean: it was asked for)."""
        clean = (0, -signal.SIGTERM, -signal.SIGINT, *((-signal.SIGKILL,) if self._killed else ()))
        return [f"{p.name} {describe_exit(p.proc.returncode)}" for p in self.parts
                if p.proc is not None and p.proc.returncode not in clean]

    # ------------------------------------------------------------ the watch

    def _run(self) -> None:
        while not self._stopping.wait(POLL_S):
            if (gone := self._redis_gone()) is not None:
                self._redis_lost = True
                return self._fail(gone)
            for part in self.parts:
                try:
                    self._look_at(part)
                except redis.RedisError as exc:  # a blip: the parts ride it out, and so do we
                    log.warning("cannot read %s's state from Redis (%s); trying again", part.name, exc)
                if self.failure is not None:
                    return

    def _look_at(self, part: Part) -> None:
        if part.proc is None:
            if time.monotonic() >= part.restart_at and not self._stopping.is_set():
                log.info("starting %s again", part.name)
                part.start(self._env)
            return
        if part.member is None:
            self._check_ready(part)
        if part.proc.poll() is not None and not self._stopping.is_set():
            self._exited(part)

    def _check_ready(self, part: Part) -> None:
        member = part.registration.find(self._client, part.proc.pid, self._host)
        if member is not None:
            part.member, part.ready_at = member, time.monotonic()
            log.info("%s is %s (pid %d)", part.name, "serving again" if part.served else "ready", part.proc.pid)
            part.served = True

    def _exited(self, part: Part) -> None:
        proc, how = part.proc, describe_exit(part.proc.returncode)
        reason = part.tail.reason() if part.tail is not None else ""
        if not part.served:
            return self._fail(f"{part.name} could not start: {reason} (it {how})" if reason
                              else f"{part.name} could not start: it {how}")
        if part.member is not None:
            part.registration.forget(self._client, part.member, proc.pid)
        ready_for = time.monotonic() - part.ready_at if part.ready_at is not None else None
        delay = part.backoff.delay(ready_for)
        when = "before it was ready again" if ready_for is None else f"after serving for {ready_for:.1f} s"
        said = f" (its last error: {reason})" if reason else ""
        log.error("%s (pid %d) %s %s%s; starting it again in %.0f s", part.name, proc.pid, how, when, said, delay)
        part.proc, part.tail, part.member, part.ready_at = None, None, None, None
        part.restart_at = time.monotonic() + delay

    def _fail(self, message: str) -> None:
        if self.failure is None and not self._stopping.is_set():
            self.failure = message
            log.error("%s; stopping", message)
            self._on_failure()
            # Asked once, the stop can be lost: a signal that comes while serve's API is still
            # starting may land where a library swallows the KeyboardInterrupt (seen once: the
            # API then started and served on, its worker gone). Ask until stop() has begun.
            while not self._stopping.wait(STOP_AGAIN_S):
                log.warning("asking again to stop (%s)", message)
                self._on_failure()
