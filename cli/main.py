"""The `vllama` command.

  vllama serve        Redis (private, unless VLLAMA_REDIS_URL is set), the API, a generation
                      worker and a pull worker
  vllama api          the API alone (needs VLLAMA_REDIS_URL)
  vllama worker       one generation worker (needs VLLAMA_REDIS_URL)
  vllama pull-worker  looks after this machine's models: pull, delete, copy (needs VLLAMA_REDIS_URL)
  vllama create       add a model to this machine's store from a local GGUF file
  vllama suggest      models that fit this machine's GPU memory
  vllama pull         pull a model on the running server, with progress bars
  vllama batch        run a JSONL file of requests as an OpenAI batch, with a progress bar
  vllama bench        throughput and time to first token, stack vs engine in-process
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading

from pydantic import ValidationError

from common.settings import Settings


def _settings(**overrides: object) -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:  # fail fast, naming the variable to fix
        lines = [f"VLLAMA_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()]
        sys.exit("invalid configuration:\n  " + "\n  ".join(lines))
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    return settings


def _run_api(settings: Settings) -> None:
    import uvicorn

    from api.app import create_app

    # Clients keep connections open between requests (ollama-python, httpx pools); closing
    # idle ones after uvicorn's default 5 s races with their reuse and fails a request.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=5, timeout_keep_alive=120)


def cmd_api(args: argparse.Namespace) -> None:
    settings = _settings(host=args.host, port=args.port)
    if not settings.redis_url:
        sys.exit("VLLAMA_REDIS_URL is not set: point it at the shared Redis (or use `vllama serve`)")
    _run_api(settings)


def cmd_worker(args: argparse.Namespace) -> None:
    from workers.main import run_worker

    settings = _settings(model=args.model)
    if not settings.redis_url:
        sys.exit("VLLAMA_REDIS_URL is not set: point it at the shared Redis (or use `vllama serve`)")
    run_worker(settings)


def cmd_pull_worker(_args: argparse.Namespace) -> None:
    from workers.pull_worker import run_pull_worker

    settings = _settings()
    if not settings.redis_url:
        sys.exit("VLLAMA_REDIS_URL is not set: point it at the shared Redis (or use `vllama serve`)")
    run_pull_worker(settings)


def cmd_create(args: argparse.Namespace) -> None:
    from pathlib import Path

    from common.errors import VllamaError
    from common.models import canonical_name
    from common.protocol import PullState
    from workers.pull import Progress, import_gguf
    from workers.store import ModelStore

    settings = _settings()
    gguf = Path(args.gguf).expanduser().resolve()
    if not gguf.is_file():
        sys.exit(f"{gguf}: no such file; give the path of a .gguf file")
    try:
        name = canonical_name(args.name)
        store = ModelStore(settings.model_cache)
        manifest = import_gguf(store, name, gguf, Progress(PullState(model=name, store_id="local")))
    except VllamaError as exc:
        sys.exit(exc.message)
    print(f"created {manifest.name} ({manifest.size / 1e9:.2f} GB) in {store.root}; "
          "running pull workers list it within seconds")


def cmd_serve(args: argparse.Namespace) -> None:
    from cli.embedded_redis import EmbeddedRedis

    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # SIGTERM action that would end this process before it stops the worker and Redis.
    signal.signal(signal.SIGTERM, lambda *_: None)
    settings = _settings(host=args.host, port=args.port, model=args.model)
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
        _run_api(settings)
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


def cmd_bench(args: argparse.Namespace) -> None:
    from cli.bench import run_bench

    run_bench(args)


def _die_with_parent() -> None:
    """In vLLM's engine processes: exit when the process that started them is gone.

    vLLM runs its engine core (and its workers) in child processes started with
    multiprocessing's spawn, which imports this module in each child. A worker killed with
    SIGKILL (the OOM killer, `kill -9`) runs no cleanup, and its engine core would live on,
    orphaned, holding memory and CPU; each child therefore watches its parent.
    """
    import threading
    import time

    # How multiprocessing's spawn starts a child. Neither sys.argv (already the parent's)
    # nor parent_process() (not set up yet) tells while the child imports this module.
    try:
        with open("/proc/self/cmdline", "rb") as f:
            if b"--multiprocessing-fork" not in f.read():
                return
    except OSError:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="vllama-parent-watch", daemon=True).start()


_die_with_parent()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="vllama", description="Ollama-compatible server on vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="everything in one command: Redis, the API, a worker and a pull worker")
    p.add_argument("--host"), p.add_argument("--port", type=int), p.add_argument("--model")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("api", help="the HTTP API alone (VLLAMA_REDIS_URL required)")
    p.add_argument("--host"), p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("worker", help="one generation worker (VLLAMA_REDIS_URL required)")
    p.add_argument("--model")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("pull-worker", help="this machine's model store: pull, delete, copy (VLLAMA_REDIS_URL required)")
    p.set_defaults(func=cmd_pull_worker)

    p = sub.add_parser("create", help="add a model to this machine's store from a local GGUF file")
    p.add_argument("name", help="the model's name, e.g. mymodel:7b")
    p.add_argument("--from", dest="gguf", required=True, metavar="FILE.gguf", help="the GGUF file")
    p.set_defaults(func=cmd_create)

    from cli import client, suggest

    suggest.add_parser(sub)
    client.add_parsers(sub)

    p = sub.add_parser("bench", help="tokens/s and time to first token: stack vs engine")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    p.add_argument("--num-predict", type=int, default=64)
    p.add_argument("--requests-per-level", type=int, default=0, help="0 = 2x the concurrency (min 4)")
    p.add_argument("--repeats", type=int, default=3, help="runs per level; the median is reported")
    p.add_argument("--model")
    p.add_argument("--during-batch", type=int, default=0, metavar="N",
                   help="instead: time to first token idle and behind N batch-class (then interactive) jobs")
    p.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
