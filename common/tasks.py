"""Small asyncio helpers shared by the API and the workers."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from contextlib import suppress
from typing import Any


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
    ``stop()`` (which drains) instead of killing the process mid-job."""

    async def main() -> None:
        worker = make_worker()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    asyncio.run(main())
