"""The server's parts, each run in this process: `vllama api`, `vllama worker` and
`vllama pull-worker`. `vllama serve` starts the same commands as child processes.

`vllama api --workers N` (VLLAMA_API_WORKERS) runs N API processes on one listening socket,
for machines whose cores one process cannot keep busy. This process then only binds the
socket and manages them (uvicorn's manager): each of them is a full API replica with its own
Redis connections and pub/sub reader, built from the environment (api.app's factory), so
every setting this process holds is put there first. The manager starts again a process that
dies (a new one within about a second; the requests it was serving fail), stops them all on
SIGINT or SIGTERM and exits 0, restarts them one by one on SIGHUP, and adds or removes one on
SIGTTIN or SIGTTOU. They are spawned children that import cli.main, so each watches its
parent (cli/parent_watch.py): the manager killed outright takes them with it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import uuid

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


# The root logger's format in every process (cli/main.py configures this one with it).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_api(settings: Settings) -> None:
    import uvicorn

    from common.redis_conn import exit_unless_reachable

    exit_unless_reachable(settings.redis_url)  # a bad URL or password: one line, not a traceback
    # Clients keep connections open between requests (ollama-python, httpx pools); closing
    # idle ones after uvicorn's default 5 s races with their reuse and fails a request.
    options: dict = dict(host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=5,
                         timeout_keep_alive=120, loop=_event_loop(), http=_http_parser(),
                         access_log=settings.access_log)
    if settings.api_workers > 1:
        _run_api_processes(settings, options)
        return
    from api.app import create_app

    uvicorn.run(create_app(settings), **options)


def _event_loop() -> str:
    """uvloop where it imports (uvicorn[standard] installs it): a faster event loop for
    every request and frame."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "auto"
    return "uvloop"


def _http_parser() -> str:
    """httptools where it imports (uvicorn[standard] installs it): a C HTTP parser."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "auto"
    return "httptools"


def _run_api_processes(settings: Settings, options: dict) -> None:
    from uvicorn.config import STARTUP_FAILURE, Config
    from uvicorn.supervisors import Multiprocess

    from api.replica_counts import GROUP_ENV

    export_settings(settings)
    # The processes' HTTP counters are summed across this group (api/replica_counts.py).
    os.environ[GROUP_ENV] = uuid.uuid4().hex[:12]
    config = Config("api.app:create_app_from_env", factory=True, workers=settings.api_workers,
                    log_config=_log_config(), **options)
    sock = config.bind_socket()
    manager = Multiprocess(config, sockets=[sock])
    try:
        manager.run()
    finally:
        sock.close()
    # uvicorn's manager stops when a process fails before it serves (it would fail the same
    # way each time) but returns as if all went well; say so, as one process would.
    if any(p.exitcode == STARTUP_FAILURE for p in manager.processes):
        sys.exit("an API process could not start; see its messages above")


def export_settings(settings: Settings) -> None:
    """Put every setting that is not a default into this process's environment, as
    VLLAMA_<NAME>, for the API processes it spawns: they read their settings from the
    environment and must see what the command line and `vllama serve` (its private Redis's
    URL) set here. Defaults stay out, so that one made per process stays per process."""
    values = settings.model_dump(mode="json", include=settings.model_fields_set)
    for name, value in values.items():
        if value is not None:
            os.environ[f"VLLAMA_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)


def _log_config() -> dict:
    """uvicorn's logging, plus the root logger as cli/main.py sets it: the spawned API
    processes run no main(), and would otherwise drop vLLama's own messages."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["vllama"] = {"format": LOG_FORMAT}
    config["handlers"]["vllama"] = {"class": "logging.StreamHandler", "formatter": "vllama",
                                    "stream": "ext://sys.stderr"}
    config["root"] = {"level": "INFO", "handlers": ["vllama"]}
    return config


def cmd_api(args: argparse.Namespace) -> None:
    settings = load_settings(host=args.host, port=args.port, api_workers=args.workers)
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
