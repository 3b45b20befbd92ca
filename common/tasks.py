"""Small asyncio helpers shared by the API and the workers."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Stop a background task and wait until it has finished unwinding (its finally blocks
    may still talk to Redis). A task that is None or already done is fine."""
    if task is None:
        return
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


def run_until_signalled(make_worker: Callable[[], Any]) -> None:
    """Run a worker process's ``run()`` until it ends; SIGINT and SIGTERM call its idempotent
    ``stop()`` (which drains) instead of killing the process mid-job. On uvloop where it is
    installed (as the API runs): its loop and sockets cost a fraction of asyncio's own per
    Redis round trip, which a worker streaming hundreds of jobs makes thousands of a second."""

    async def main() -> None:
        worker = make_worker()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


# A Redis restart or a Sentinel failover takes seconds; the end of a job must outlast it.
FINAL_WRITE_PATIENCE_S = 30.0


async def until_redis_answers(write: Callable[[], Awaitable[T]], what: str,
                              patience_s: float = FINAL_WRITE_PATIENCE_S) -> T:
    """Run ``write`` (a job's last frame, its final record, arq's end of it) again until Redis
    answers or ``patience_s`` has passed. Lost, such a write leaves a client or a batch
    waiting on a job that has ended, or arq counting it as running for an hour."""
    from redis.exceptions import RedisError

    deadline = time.monotonic() + patience_s
    delay = 0.1
    while True:
        try:
            return await write()
        except (RedisError, OSError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: Redis unreachable (%s); trying again in %.1f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)
