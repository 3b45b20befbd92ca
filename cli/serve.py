"""`vllama serve`: a private Redis (unless VLLAMA_REDIS_URL is set), the API in this process,
and a generation worker and a pull worker as child processes, kept running by
cli/supervisor.py. With VLLAMA_API_WORKERS above 1, this process manages that many API
processes instead of serving itself (cli/parts.py); what follows holds the same.

What must stay true: SIGINT or SIGTERM stops every part and serve exits 0; a second one
while the workers drain their running jobs ends them at once; a part that cannot start stops
serve with a message naming it and why (exit status 1); a part that dies after it served is
started again while the API keeps answering (/health says 503 while no worker is ready).
Serve killed outright (SIGKILL) takes every child with it (cli/spawn.py).

Its private Redis, too, is started again when it dies: it keeps its data in an append-only
file, and every part rides out Redis being away for a moment (the same as a restart of a
shared Redis), so a Redis killed by the OOM killer costs seconds, not the server. Only a
Redis that then cannot start (its file damaged, its port taken) stops serve, saying why.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from cli.embedded_redis import EmbeddedRedis
from cli.parts import load_settings, run_api
from cli.supervisor import PULL_WORKER, WORKER, Backoff, Part, Supervisor, describe_exit

log = logging.getLogger(__name__)


def cmd_serve(args: argparse.Namespace) -> None:
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # SIGTERM action that would end this process before it stops the worker and Redis.
    signal.signal(signal.SIGTERM, lambda *_: None)
    settings = load_settings(host=args.host, port=args.port, model=args.model)
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(data_dir=settings.home / "redis", appendfsync=settings.redis_appendfsync,
                                 maxmemory=settings.redis_maxmemory)
        try:
            embedded.start()
        except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
            sys.exit(f"vllama serve: cannot start its private Redis: {exc}")
        settings.redis_url = embedded.url
        log.info("started a private Redis at %s (password in %s); its data: %s (append-only file, fsync %s, "
                 "maxmemory %s)", embedded.shown_url, embedded.data_dir / "redis-password", embedded.data_dir,
                 settings.redis_appendfsync, settings.redis_maxmemory)
    # One command, a whole server: a model named in a request is pulled if need be.
    if "VLLAMA_AUTO_PULL" not in os.environ:
        settings.auto_pull = "aliases"
    env = {**os.environ, "VLLAMA_REDIS_URL": settings.redis_url, "VLLAMA_MODEL": settings.model}
    command = [sys.executable, "-m", "cli"]
    keeper = RedisKeeper(embedded)
    supervisor = Supervisor(
        [Part("the worker", [*command, "worker"], WORKER),
         Part("the pull worker", [*command, "pull-worker"], PULL_WORKER)],
        env, settings.redis_url,
        # Stops the API (uvicorn's handler, or KeyboardInterrupt before it is installed).
        on_failure=lambda: os.kill(os.getpid(), signal.SIGINT),
        redis_gone=keeper.check,
    )
    try:
        supervisor.start()
        run_api(settings)
    except KeyboardInterrupt:
        pass  # a stop signal that came before the API had started: stop the rest as usual
    finally:
        _stop(supervisor, embedded)
    if supervisor.failure is not None:
        sys.exit(f"vllama serve: {supervisor.failure}; see the messages above")
    if unclean := supervisor.unclean_exits():
        sys.exit(f"vllama serve: {'; '.join(unclean)} while stopping; see the messages above")


def _hurry(*_: object) -> None:
    raise KeyboardInterrupt


def _stop(supervisor: Supervisor, embedded: EmbeddedRedis | None) -> None:
    """The parts first (they drain their running jobs, up to 45 s), Redis last (they use it
    while they drain). A second SIGINT or SIGTERM meanwhile kills the parts at once; a
    third ends serve at once, its children with it (cli/spawn.py)."""
    signal.signal(signal.SIGINT, _hurry)
    signal.signal(signal.SIGTERM, _hurry)
    try:
        supervisor.stop()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        log.warning("stopping at once: the parts are killed, their running jobs end unfinished")
        supervisor.kill()
    if embedded is not None:
        embedded.stop()


class RedisKeeper:
    """Starts serve's private Redis again when it dies, with the same delays as the other
    parts (1 s, doubling while it keeps dying). Its ``check`` runs in the supervisor's watch:
    None while all is well, or why serve cannot go on."""

    def __init__(self, embedded: EmbeddedRedis | None) -> None:
        self.embedded = embedded
        self.backoff = Backoff()
        self.started_at = time.monotonic()
        self.restart_at: float | None = None

    def check(self) -> str | None:
        redis = self.embedded
        if redis is None or redis.alive():
            return None
        now = time.monotonic()
        if self.restart_at is None:
            served_s = now - self.started_at
            delay = self.backoff.delay(served_s)
            log.error("its private Redis (pid %s) %s after serving for %.1f s (its log: %s); starting it again "
                      "in %.0f s", redis.pid, describe_exit(redis.returncode or 0), served_s, redis.log_path, delay)
            self.restart_at = now + delay
            return None
        if now < self.restart_at:
            return None
        try:
            redis.start()
        except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
            return f"its private Redis exited and cannot start again: {exc}"
        log.info("its private Redis is serving again (pid %d), with the data of its append-only file", redis.pid)
        self.restart_at, self.started_at = None, time.monotonic()
        return None
