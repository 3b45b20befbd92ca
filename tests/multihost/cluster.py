"""A vLLama cluster spread over network-namespace hosts: Redis, the API, and per worker host a
generation worker plus its pull worker, each a real process started the way an operator would
(`vllama api`, `vllama worker`, `vllama pull-worker`), talking only over the network.

Faults are injected from outside, as they happen in production: a host's link goes down, a
process gets SIGKILL or SIGTERM, Redis restarts empty, a host's clock is off. Every process
logs to its own file; ``log_tails`` is printed when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cli.embedded_redis import find_redis_server
from tests import harness
from tests.multihost.clock import skewed_env
from tests.multihost.netns import Host, Network

ROOT = Path(__file__).resolve().parents[2]
API_PORT = 11434
REDIS_PORT = 6379
FAKE_MODEL = "fake:test"
VLLAMA_MODULE = harness.VLLAMA_MODULE


def _clean_environ() -> dict[str, str]:
    """The test's environment without its vLLama settings: each process gets exactly the
    settings its host should have."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("VLLAMA_", "OLLAMA_", "LD_PRELOAD", "FAKETIME"))}


@dataclass
class Service:
    """One process on one host, restartable with the same command line."""

    name: str
    host: Host
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen | None = None
    starts: int = 0
    _log: object = field(default=None, repr=False)

    def start(self) -> Service:
        assert not self.alive(), f"{self.name} is already running"
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n===== start #{self.starts + 1} at {time.strftime('%H:%M:%S')} =====\n".encode())
        self._log.flush()
        self.popen = subprocess.Popen(
            self.host.exec_argv(self.argv), cwd=ROOT, env={**_clean_environ(), **self.env},
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the test run must not reach it before clean-up
        )
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, and wait: the process is gone when this returns."""
        if self.popen is not None:
            self.signal(signal.SIGKILL)
            self.popen.wait()

    def terminate(self, timeout_s: float = 60) -> int | None:
        """SIGTERM and wait for the exit (SIGKILL past ``timeout_s``); the exit status."""
        if self.popen is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.returncode

    def children(self) -> list[int]:
        """Pids of its child processes (a real worker's engine core runs in one)."""
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            return [c.pid for c in psutil.Process(self.pid).children(recursive=True)]
        return []

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


class Cluster:
    """Hosts ``redis`` and ``api``, and one host per name in ``worker_hosts`` with a
    generation worker and a pull worker (its own VLLAMA_HOME: its own model store).

    ``clocks`` maps a worker host to a clock offset such as ``"+30s"``; ``worker_env`` and
    ``api_env`` add settings; ``store_models`` maps a worker host to model names written to
    its store before its pull worker starts; ``start`` returns once ``wait_workers`` (default:
    all) are ready in /health."""

    def __init__(self, tmp: Path, worker_hosts: tuple[str, ...] = ("w1", "w2"), *,
                 clocks: dict[str, str] | None = None, worker_env: dict[str, str] | None = None,
                 api_env: dict[str, str] | None = None, store_models: dict[str, list[str]] | None = None,
                 wait_workers: int | None = None) -> None:
        self.tmp = tmp
        self.worker_hosts = worker_hosts
        self.clocks = clocks or {}
        self.worker_env = worker_env or {}
        self.api_env = api_env or {}
        self.store_models = store_models or {}
        self.wait_workers = len(worker_hosts) if wait_workers is None else wait_workers
        self.net = Network(["redis", "api", *worker_hosts])
        self.services: dict[str, Service] = {}
        (tmp / "logs").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ addresses

    @property
    def redis_url(self) -> str:
        return f"redis://{self.net['redis'].addr}:{REDIS_PORT}/0"

    @property
    def base_url(self) -> str:
        return f"http://{self.net['api'].addr}:{API_PORT}"

    def home(self, host: str) -> Path:
        return self.tmp / "homes" / host

    # ------------------------------------------------------------ start and stop

    def _service(self, name: str, host: str, argv: list[str], env: dict[str, str]) -> Service:
        svc = Service(name=name, host=self.net[host], argv=argv, env={"PYTHONUNBUFFERED": "1", **env},
                      log_path=self.tmp / "logs" / f"{name}.log")
        self.services[name] = svc
        return svc

    def _vllama(self, *args: str) -> list[str]:
        return [sys.executable, "-m", VLLAMA_MODULE, *args]

    def start(self, timeout_s: float = 90) -> Cluster:
        self.net.up()
        (self.tmp / "redis").mkdir(exist_ok=True)
        self._service("redis", "redis", [
            find_redis_server(), "--bind", self.net["redis"].addr, "--port", str(REDIS_PORT),
            "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", str(self.tmp / "redis"),
        ], {})
        self._service("api", "api", self._vllama("api", "--host", self.net["api"].addr, "--port", str(API_PORT)),
                      {"VLLAMA_REDIS_URL": self.redis_url, **self.api_env})
        for host in self.worker_hosts:
            self.home(host).mkdir(parents=True, exist_ok=True)
            if self.store_models.get(host):
                from tests.model_factory import write_model

                for model in self.store_models[host]:
                    write_model(self.home(host), model)
            env = {"VLLAMA_REDIS_URL": self.redis_url, "VLLAMA_HOME": str(self.home(host)),
                   "VLLAMA_ENGINE": "fake", "VLLAMA_MODEL": FAKE_MODEL, "HF_HUB_OFFLINE": "1",
                   "VLLAMA_JOB_LOG": "1",  # clients.executions() counts each job's starts in the logs
                   **self.worker_env}
            if host in self.clocks:
                env.update(skewed_env(self.clocks[host]))
            self._service(f"worker@{host}", host, self._vllama("worker"), env)
            self._service(f"pull-worker@{host}", host, self._vllama("pull-worker"), env)
        self.services["redis"].start()
        self.wait_redis(20)
        for name, svc in self.services.items():
            if name != "redis":
                svc.start()
        self.wait_ready(self.wait_workers, timeout_s)
        return self

    def stop(self) -> None:
        """Every process, then the network; safe after a failed or partial start."""
        for name, svc in self.services.items():
            if name != "redis":
                svc.signal(signal.SIGKILL)
        for svc in self.services.values():
            svc.kill()
            if svc._log is not None:
                svc._log.close()
        self.net.teardown()

    # ------------------------------------------------------------ faults

    def restart(self, name: str) -> Service:
        svc = self.services[name]
        if svc.alive():
            svc.kill()
        return svc.start()

    def kill_engine(self, host: str) -> list[int]:
        """SIGKILL the engine processes under the worker of ``host`` (real vLLM runs its
        engine core in a child process; the fake engine has none, so this finds nothing)."""
        pids = self.services[f"worker@{host}"].children()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    # ------------------------------------------------------------ looking at it

    def redis_up(self) -> bool:
        import redis

        return harness.answers_ping(redis.Redis.from_url(self.redis_url, socket_connect_timeout=0.5, socket_timeout=1))

    def wait_redis(self, timeout_s: float) -> None:
        def up() -> bool:
            if not self.services["redis"].alive():
                raise RuntimeError(f"redis-server exited:\n{self.services['redis'].log_tail()}")
            return self.redis_up()

        harness.wait_until(up, timeout_s, "Redis to answer")

    def health(self, timeout_s: float = 3) -> dict:
        try:
            r = httpx.get(self.base_url + "/health", timeout=timeout_s)
            return r.json() | {"http_status": r.status_code}
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": repr(exc), "workers": []}

    def ready_workers(self) -> dict[str, str]:
        """Host name -> worker id of every worker /health lists as ready."""
        return {w["host"]: w["worker_id"] for w in self.health().get("workers", []) if w.get("state") == "ready"}

    def wait_ready(self, n_workers: int, timeout_s: float) -> dict[str, str]:
        def ready() -> dict[str, str] | None:
            for svc in self.services.values():
                if svc.starts and not svc.alive():
                    raise RuntimeError(f"{svc.name} exited with {svc.popen.returncode}:\n{svc.log_tail()}")
            workers = self.ready_workers()
            return workers if len(workers) >= n_workers else None

        return harness.wait_until(ready, timeout_s, f"{n_workers} workers ready in /health", interval_s=0.25)

    def log_tails(self, n: int = 60) -> str:
        parts = [f"----- {name} ({svc.log_path}) -----\n{svc.log_tail(n)}" for name, svc in self.services.items()]
        return "\n".join(parts)
