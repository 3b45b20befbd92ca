"""The server's parts, each run in this process: `vllama api`, `vllama worker` and
`vllama pull-worker`. `vllama serve` starts the same commands as child processes."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from common.settings import Settings

NO_REDIS = "VLLAMA_REDIS_URL is not set: point it at the shared Redis (or use `vllama serve`)"


def load_settings(**overrides: object) -> Settings:
    """The settings from the environment, with the command line's values (those not None)
    on top; exits naming each variable to fix when one is invalid."""
    try:
        settings = Settings()
    except ValidationError as exc:  # fail fast, naming the variable to fix
        lines = [f"VLLAMA_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()]
        sys.exit("invalid configuration:\n  " + "\n  ".join(lines))
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    return settings


def run_api(settings: Settings) -> None:
    import uvicorn

    from api.app import create_app
    from common.redis_conn import exit_unless_reachable

    exit_unless_reachable(settings.redis_url)  # a bad URL or password: one line, not a traceback
    # Clients keep connections open between requests (ollama-python, httpx pools); closing
    # idle ones after uvicorn's default 5 s races with their reuse and fails a request.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=5, timeout_keep_alive=120)


def cmd_api(args: argparse.Namespace) -> None:
    settings = load_settings(host=args.host, port=args.port)
    if not settings.redis_url:
        sys.exit(NO_REDIS)
    run_api(settings)


def cmd_worker(args: argparse.Namespace) -> None:
    from workers.main import run_worker

    settings = load_settings(model=args.model)
    if not settings.redis_url:
        sys.exit(NO_REDIS)
    run_worker(settings)


def cmd_pull_worker(_args: argparse.Namespace) -> None:
    from common.redis_conn import exit_unless_reachable
    from workers.pull_worker import run_pull_worker

    settings = load_settings()
    if not settings.redis_url:
        sys.exit(NO_REDIS)
    exit_unless_reachable(settings.redis_url)
    run_pull_worker(settings)
