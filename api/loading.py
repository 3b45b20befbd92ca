"""Getting a model onto a worker, and off it again, from the API's side.

A request for a model no live worker holds is not a 404 when the model can be had: if some
store has it (or it is bundled) the API asks for a load by adding it to ``vllama:loads``,
which workers with room claim; if no store has it and auto-pull is on, it is pulled first.
The request's job waits in the model's queue meanwhile. A failed load is written to
``vllama:load:<model>``, which waiting requests read to fail with the worker's reason.

Auto-pull lets a request start a download, so by default (VLLAMA_AUTO_PULL=aliases, what
`vllama serve` sets) only names from the alias table qualify: a request, or a web page making
one, cannot have the server fetch an arbitrary repository. VLLAMA_AUTO_PULL=any allows any repo
id; /api/pull always pulls what it is asked for.
"""

from __future__ import annotations

import asyncio
import time

from arq.connections import ArqRedis

from api.pubsub import FrameMultiplexer
from api.pulls import pull_to_end
from common import catalog, clock, keys, registry
from common.errors import ModelNotFound, Unavailable, from_code
from common.models import is_alias, is_repo_id, same_model, source_for
from common.records import LoadRecord
from common.settings import Settings

POLL_S = 0.25


class Loader:
    def __init__(self, redis: ArqRedis, mux: FrameMultiplexer, settings: Settings) -> None:
        self.redis = redis
        self.mux = mux
        self.settings = settings

    async def live_workers(self) -> list[registry.WorkerInfo]:
        return await registry.live_workers(self.redis)

    async def known(self, model: str) -> bool:
        """On some live store, or bundled with vLLama (made from its package on first load)."""
        if await catalog.lookup(self.redis, model) is not None:
            return True
        source = source_for(model)
        return source is not None and source.bundled is not None

    def may_auto_pull(self, model: str) -> bool:
        """Whether a request naming ``model``, which no store has, may start its download."""
        if self.settings.auto_pull == "any":
            return source_for(model) is not None
        return self.settings.auto_pull == "aliases" and is_alias(model)

    async def request(self, model: str) -> None:
        """Ask for ``model`` to be loaded (pulling it first when allowed); 404 if it cannot be
        had, 503 if no worker may load it."""
        if not await self.known(model):
            if not self.may_auto_pull(model):
                raise ModelNotFound(model)
            await pull_to_end(self.redis, self.mux, self.settings, model)
        await self._ask(model)

    async def resolve(self, model: str, workers: list[registry.WorkerInfo]) -> str:
        """The spelling the cluster knows ``model`` by, given the live ``workers``. Repo ids
        match whatever their case, as on the Hub: a request for ``QWEN/x`` runs on the workers
        serving ``Qwen/x``, not on a second copy loaded under another name."""
        if not is_repo_id(model) or any(model in w.models for w in workers):
            return model
        held = [m for w in workers for m in w.models if is_repo_id(m) and same_model(m, model)]
        if held:
            return held[0]
        entry = await catalog.lookup(self.redis, model)
        return entry.manifest.name if entry is not None else model

    async def ask_later(self, model: str) -> None:
        """Ask for ``model`` even though no worker may load it now: a worker that starts later
        claims the request (a job waiting for it stays queued meanwhile)."""
        await self.redis.zadd(keys.LOADS, {model: int(clock.now() * 1000)}, nx=True)

    async def _ask(self, model: str) -> None:
        workers = [w for w in await self.live_workers() if w.state != "draining"]
        if not workers:
            raise Unavailable(f"no worker is running to load '{model}'; start one with `vllama worker`")
        if not any(w.allows(model) for w in workers):
            allowed = sorted({p for w in workers for p in w.may_load})
            raise Unavailable(f"no worker may load '{model}' (the workers' VLLAMA_MODELS allow "
                              f"{', '.join(allowed)}); start a worker that may, or use another model")
        await self.ask_later(model)

    async def check_waiting(self, model: str, since: float) -> None:
        """For a request waiting for ``model``, which no worker holds: raise the reason the
        latest load attempt failed, or that waiting took too long; else ask again (a worker
        that died while loading leaves the request unclaimed)."""
        raw = await self.redis.get(keys.load_record(model))
        record = LoadRecord.model_validate_json(raw) if raw else None
        if record is not None and record.status == "failed" and record.at >= since:
            raise from_code(record.code or "internal", record.error or f"loading {model} failed")
        if clock.now() - since > self.settings.load_timeout_s:
            await self.redis.zrem(keys.LOADS, model)
            raise Unavailable(f"timed out after {self.settings.load_timeout_s:.0f} s waiting for a worker "
                              f"to load '{model}'; the workers may all be busy with other models "
                              "(VLLAMA_MAX_LOADED_MODELS)")
        await self._ask(model)

    async def wait_loaded(self, model: str, since: float) -> None:
        """Until a worker serves ``model`` (the answer to an empty prompt)."""
        while True:
            workers = await self.live_workers()
            if any((s := w.status_of(model)) is not None and s.state == "ready" for w in workers):
                return
            if not any(model in w.models for w in workers):
                await self.check_waiting(model, since)
            await asyncio.sleep(POLL_S)

    async def set_keep_alive(self, model: str, seconds: float | None) -> None:
        if seconds is None:
            await self.redis.delete(keys.keep_alive(model))
        else:
            await self.redis.set(keys.keep_alive(model), repr(seconds))

    async def unload(self, model: str, wait_s: float = 10.0) -> None:
        """keep_alive 0: every worker unloads the model as soon as it is idle. Waits a little
        for that, so a following /api/ps no longer lists it."""
        held = any(model in w.models for w in await self.live_workers())
        if not held and not await self.known(model):
            raise ModelNotFound(model)
        await self.set_keep_alive(model, 0.0)
        deadline = time.monotonic() + wait_s
        while held and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            held = any(model in w.models for w in await self.live_workers())
