"""The worker's heartbeat, sent from a thread of its own.

Beating from the event loop made liveness depend on how busy the loop is: a worker streaming
thousands of frames a second (or loading a model) could miss its TTL and be declared dead
while working. A thread keeps beating whatever the loop does, so a separate check keeps it
honest: if the event loop has not run for ``stall_s``, the thread stops beating and the
worker is (rightly) seen as dead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from common import clock, registry
from common.redis_conn import sync_client
from common.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        redis_url: str,
        info: registry.WorkerInfo,
        refresh: Callable[[], None],
        interval_s: float,
        ttl_s: float,
        stall_s: float = 30.0,
    ) -> None:
        self._url = redis_url
        self._info = info
        self._refresh = refresh  # updates info's counters; called from the heartbeat thread
        self._interval = interval_s
        self._ttl = ttl_s
        self._stall = stall_s
        self._stopped = threading.Event()
        self._wake = threading.Event()
        self._loop_seen = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="vllama-heartbeat", daemon=True)
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._mark_loop_alive())
        self._thread.start()

    def poke(self) -> None:
        """Beat now: the worker's models changed, and the API routes by what it reads."""
        self._wake.set()

    async def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        await cancel_and_wait(self._loop_task)
        await asyncio.to_thread(self._thread.join)

    async def _mark_loop_alive(self) -> None:
        while True:
            self._loop_seen = time.monotonic()
            await asyncio.sleep(self._interval)

    def _beat(self) -> None:
        client = sync_client(self._url, socket_timeout=self._ttl)
        synced = float("-inf")
        try:
            while not self._stopped.is_set():
                if time.monotonic() - synced > clock.RESYNC_S:
                    try:
                        clock.sync_blocking(client)
                        synced = time.monotonic()
                    except Exception:  # noqa: BLE001 - measured again next beat
                        log.warning("could not read Redis's clock", exc_info=True)
                stalled = time.monotonic() - self._loop_seen
                if stalled > self._stall:
                    log.error("event loop stalled for %.0f s; no heartbeat until it runs again", stalled)
                else:
                    try:
                        self._refresh()
                        registry.publish_heartbeat(client, self._info, self._ttl)
                    except Exception:  # noqa: BLE001 - a Redis blip must not end the heartbeat
                        log.warning("heartbeat failed", exc_info=True)
                self._wake.wait(self._interval)
                self._wake.clear()
        finally:
            client.close()
