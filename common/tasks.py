"""Small asyncio helpers shared by the API and the workers."""

from __future__ import annotations

import asyncio
from contextlib import suppress


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Stop a background task and wait until it has finished unwinding (its finally blocks
    may still talk to Redis). A task that is None or already done is fine."""
    if task is None:
        return
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
