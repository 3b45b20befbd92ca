"""`vllama serve`: a private Redis (unless VLLAMA_REDIS_URL is set), the API in this process,
and a generation worker and a pull worker as child processes."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading

from cli.parts import load_settings, run_api


def cmd_serve(args: argparse.Namespace) -> None:
    from cli.embedded_redis import EmbeddedRedis

    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # SIGTERM action that would end this process before it stops the worker and Redis.
    signal.signal(signal.SIGTERM, lambda *_: None)
    settings = load_settings(host=args.host, port=args.port, model=args.model)
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(data_dir=settings.home / "redis").start()
        settings.redis_url = embedded.url
        logging.info("started a private Redis at %s", embedded.url)
    # One command, a whole server: a model named in a request is pulled if need be.
    if "VLLAMA_AUTO_PULL" not in os.environ:
        settings.auto_pull = True
    env = {**os.environ, "VLLAMA_REDIS_URL": settings.redis_url, "VLLAMA_MODEL": settings.model}
    children = {
        "the worker": subprocess.Popen([sys.executable, "-m", "cli", "worker"], env=env),
        "the pull worker": subprocess.Popen([sys.executable, "-m", "cli", "pull-worker"], env=env),
    }
    stopping = threading.Event()
    for what, proc in children.items():
        _stop_when_exited(proc, what, stopping)
    try:
        run_api(settings)
    except KeyboardInterrupt:
        pass  # a stop signal that came before the API had started: stop the rest as usual
    finally:
        stopping.set()
        for proc in children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in children.values():
            try:
                proc.wait(45)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if embedded is not None:
            embedded.stop()
    for what, proc in children.items():
        if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
            sys.exit(f"vllama serve: {what} exited with status {proc.returncode}; see the messages above")


def _stop_when_exited(proc: subprocess.Popen, what: str, stopping: threading.Event) -> None:
    """Serve is one server: if a part of it dies (a worker that cannot load its model),
    stop the rest instead of answering 404s forever. Once serve is stopping anyway, the
    parts it stops are expected to exit."""

    def watch() -> None:
        if proc.wait() != 0 and not stopping.is_set():
            stopping.set()
            logging.error("%s exited with status %s; stopping", what, proc.returncode)
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="serve-watch", daemon=True).start()
