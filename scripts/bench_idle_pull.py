"""What an idle pull worker costs: its user+system CPU time over --idle-s seconds with no store
job to do, read from /proc/<pid>/stat, after --settle-s seconds to start.

Starts a private Redis and one real `vllama pull-worker` process with an empty VLLAMA_HOME.

    .venv/bin/python scripts/bench_idle_pull.py [--idle-s 30] [--settle-s 15]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.embedded_redis import EmbeddedRedis  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--settle-s", type=float, default=15.0)
    args = parser.parse_args()
    redis = EmbeddedRedis().start()
    try:
        with tempfile.TemporaryDirectory() as home:
            env = {**os.environ, "VLLAMA_REDIS_URL": redis.url, "VLLAMA_HOME": home}
            worker = subprocess.Popen([sys.executable, "-m", "cli", "pull-worker"], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(args.settle_s)
                before, started = cpu_seconds(worker.pid), time.monotonic()
                time.sleep(args.idle_s)
                used, elapsed = cpu_seconds(worker.pid) - before, time.monotonic() - started
                print(f"idle pull worker: {100 * used / elapsed:.2f}% of a core over {elapsed:.0f} s")
            finally:
                worker.terminate()
                worker.wait(30)
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
