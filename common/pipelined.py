"""Commands from concurrent callers sent together: one round trip for all of them.

Under load an API process takes hundreds of requests a second, and each enqueue was a round
trip of its own: a socket write, a wake-up, a parse. Here a caller's command waits, at most
until the event loop comes round, for those of the other requests being handled at the same
moment, and they all go in one pipeline; each caller gets its own reply, or its own error
(a full Redis refuses one script, not the batch). Alone, a command goes out at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis


class Pipelined:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task | None = None

    async def eval(self, *args: Any) -> Any:
        """``redis.eval(*args)``, sent with the other callers' commands of the moment."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((args, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name="pipelined-eval")
        return await future

    async def _send(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for args, _ in batch:
                            pipe.eval(*args)
                        replies = await pipe.execute(raise_on_error=False)
                except Exception as exc:  # the connection: every caller of the batch gets it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                except BaseException:
                    for _, future in batch:
                        future.cancel()
                    raise
                for (_, future), reply in zip(batch, replies):
                    if future.done():  # its caller was cancelled meanwhile
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        finally:
            self._sender = None
