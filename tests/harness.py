"""Helpers shared by the tests: processes, ports, waiting, NDJSON."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from cli.embedded_redis import free_port

ROOT = Path(__file__).resolve().parent.parent
# What tests run as `python -m <module> ...` to start a vllama process (the `vllama` command).
VLLAMA_MODULE = "cli"


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


async def async_wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)


def answers_ping(client) -> bool:
    """Whether a (synchronous) Redis client's server answers; closes the client."""
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def ndjson_lines(text: str) -> list[dict]:
    lines = text.split("\n")
    assert lines[-1] == "", "an NDJSON stream ends with a newline"
    assert all(lines[:-1]), "no blank lines inside an NDJSON stream"
    return [json.loads(line) for line in lines[:-1]]


class Proc:
    """A `vllama` subprocess with its output in a log file (read when a test fails)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", VLLAMA_MODULE, *args],
            cwd=ROOT, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def kill_tree(self) -> None:
        """Test clean-up: nothing this process started may outlive the test."""
        import psutil

        try:
            children = psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        self.kill()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    def stop(self, timeout_s: float = 30) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def start_api(redis_url: str, log_dir: Path, **env: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(["api", "--port", str(port)], {"VLLAMA_REDIS_URL": redis_url, **env}, log_dir / f"api-{port}.log")
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"api exited:\n{proc.log_tail()}")
        try:
            return httpx.get(base + "/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 30, "the API to answer")
    return proc, base


async def run_cli(base_url: str, *args: str) -> tuple[int, str]:
    """`vllama ...` against the stack at ``base_url``; returns (exit code, stdout + stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", VLLAMA_MODULE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "OLLAMA_HOST": base_url}, cwd=ROOT)
    out, _ = await proc.communicate()
    return proc.returncode, out.decode()
