"""`vllama serve`: a private Redis (unless VLLAMA_REDIS_URL is set), the API in this process,
and a generation worker and a pull worker as child processes, kept running by
cli/supervisor.py.

What must stay true: SIGINT or SIGTERM stops every part and serve exits 0; a part that
cannot start stops serve with a message naming it and why (exit status 1); a part that dies
after it served is started again while the API keeps answering (/health says 503 while no
worker is ready).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from cli.embedded_redis import EmbeddedRedis
from cli.parts import load_settings, run_api
from cli.supervisor import PULL_WORKER, WORKER, Part, Supervisor

log = logging.getLogger(__name__)


def cmd_serve(args: argparse.Namespace) -> None:
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # SIGTERM action that would end this process before it stops the worker and Redis.
    signal.signal(signal.SIGTERM, lambda *_: None)
    settings = load_settings(host=args.host, port=args.port, model=args.model)
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(data_dir=settings.home / "redis", appendfsync=settings.redis_appendfsync)
        try:
            embedded.start()
        except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
            sys.exit(f"vllama serve: cannot start its private Redis: {exc}")
        settings.redis_url = embedded.url
        log.info("started a private Redis at %s; its data: %s (append-only file, fsync %s)",
                 embedded.url, embedded.data_dir, settings.redis_appendfsync)
    # One command, a whole server: a model named in a request is pulled if need be.
    if "VLLAMA_AUTO_PULL" not in os.environ:
        settings.auto_pull = "aliases"
    env = {**os.environ, "VLLAMA_REDIS_URL": settings.redis_url, "VLLAMA_MODEL": settings.model}
    command = [sys.executable, "-m", "cli"]
    supervisor = Supervisor(
        [Part("the worker", [*command, "worker"], WORKER),
         Part("the pull worker", [*command, "pull-worker"], PULL_WORKER)],
        env, settings.redis_url,
        # Stops the API (uvicorn's handler, or KeyboardInterrupt before it is installed).
        on_failure=lambda: os.kill(os.getpid(), signal.SIGINT),
        redis_gone=lambda: _gone(embedded),
    )
    try:
        supervisor.start()
        run_api(settings)
    except KeyboardInterrupt:
        pass  # a stop signal that came before the API had started: stop the rest as usual
    finally:
        supervisor.stop()
        if embedded is not None:
            embedded.stop()
    if supervisor.failure is not None:
        sys.exit(f"vllama serve: {supervisor.failure}; see the messages above")
    if unclean := supervisor.unclean_exits():
        sys.exit(f"vllama serve: {'; '.join(unclean)} while stopping; see the messages above")


def _gone(embedded: EmbeddedRedis | None) -> str | None:
    """Why serve cannot go on without its private Redis, once that has exited; None while it
    runs (or when the Redis is not serve's own)."""
    if embedded is None or embedded.alive():
        return None
    return f"its private Redis exited (its log: {embedded.log_path}); every part needs it"
