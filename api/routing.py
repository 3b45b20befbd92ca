"""Which worker runs a job: the least loaded, or the one whose prefix cache holds the prompt's
beginning.

Every worker serving a model takes jobs from the model's one queue; left alone, whichever
polls first takes as many as it has room for, and a burst lands on one worker while another
idles. So the API routes each job as it queues it:
- balance: to the worker with the fewest jobs for the model, running and routed to it but not
  taken yet, for its number of slots (the fuller its KV cache, the later among equals);
- affinity: a prompt that begins as one run in the last minutes (a shared system prompt, the
  conversation a chat continues) goes to the worker that ran it, whose vLLM prefix cache
  likely still holds those tokens, unless that worker is much busier than the least loaded.

A route is a hold, not a move: the job stays in the shared queue, and for
``settings.route_hold_s`` only the worker it is routed to takes it (the claim script in
common/job_consumer.py checks ``keys.route``); after that any worker does. A routed worker
that died, stalled or is full therefore delays a job by that hold at most, and strands none.

Prefixes are compared as chained hashes of blocks of text (common/prefixes.py); the deepest
block with a known owner says where the longest shared prefix was run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from common import clock, keys
from common.prefixes import BLOCK_CHARS, FIRST_COMPARED, prefix_hashes
from common.protocol import GenerationJob, JobRoute
from common.registry import WorkerInfo

Reason = Literal["balance", "affinity"]


@dataclass
class Candidate:
    worker_id: str
    slots: int
    kv_cache_usage: float
    load: int = 0  # jobs running and routed to it, for this model


class Router:
    """Routes jobs to workers (see the module's docstring); one per API process."""

    def __init__(self, redis: Redis, hold_s: float, affinity: bool = True) -> None:
        self.redis = redis
        self.hold_ms = int(hold_s * 1000)
        self.affinity = affinity  # off: balance alone
        # Jobs this process routed whose enqueue has not reached Redis yet: requests routed at
        # the same moment must see each other, or a burst would all pick the same worker.
        self._pending: dict[tuple[str, str], int] = {}

    async def route(self, jobs: list[GenerationJob], workers: list[WorkerInfo]) -> None:
        """Set each job's ``route`` (left None where no worker is ready for its model)."""
        if not jobs:
            return
        model = jobs[0].model
        candidates = _candidates(model, workers)
        if not candidates:
            return
        now_ms = clock.now_ms()
        if len(candidates) == 1:  # no choice to make: no loads or owners to read
            for job in jobs:
                self._set(job, candidates[0], "balance", 0, now_ms)
            return
        prefixes = [prefix_hashes(j) if self.affinity else [] for j in jobs]
        lookups = sorted({h for hs in prefixes for h in hs[FIRST_COMPARED:]})
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in candidates:
                pipe.hget(keys.busy(c.worker_id), model)
                pipe.zcount(keys.routed(c.worker_id), now_ms, "+inf")
            if lookups:
                pipe.mget([keys.prefix_owner(model, h) for h in lookups])
            answers = await pipe.execute()
        for i, c in enumerate(candidates):
            running = max(0, int(answers[2 * i] or 0))  # never below 0, should a write have been lost
            c.load = running + int(answers[2 * i + 1] or 0) + self._pending.get((model, c.worker_id), 0)
        owners = dict(zip(lookups, (o.decode() if o else None for o in answers[-1]))) if lookups else {}
        for job, hashes in zip(jobs, prefixes):
            chosen, reason, shared = self._choose(candidates, hashes, owners)
            self._set(job, chosen, reason, shared, now_ms)

    def _set(self, job: GenerationJob, chosen: Candidate, reason: Reason, shared: int, now_ms: int) -> None:
        chosen.load += 1
        job.route = JobRoute(worker_id=chosen.worker_id, reason=reason, prefix_chars=shared,
                             until_ms=now_ms + self.hold_ms)
        key = (job.model, chosen.worker_id)
        self._pending[key] = self._pending.get(key, 0) + 1

    def settle(self, jobs: list[GenerationJob]) -> None:
        """The jobs' enqueues are done (or failed): Redis counts them from now on."""
        for job in jobs:
            if job.route is not None:
                key = (job.model, job.route.worker_id)
                self._pending[key] = self._pending.get(key, 0) - 1
                if self._pending[key] <= 0:
                    del self._pending[key]

    def _choose(self, candidates: list[Candidate], hashes: list[str],
                owners: dict[str, str | None]) -> tuple[Candidate, Reason, int]:
        least = min(candidates, key=lambda c: (c.load / max(c.slots, 1), c.kv_cache_usage, random.random()))
        by_id = {c.worker_id: c for c in candidates}
        for depth in range(len(hashes) - 1, FIRST_COMPARED - 1, -1):
            owner = by_id.get(owners.get(hashes[depth]) or "")
            if owner is not None:
                # Balance wins over a cache that saves less than the wait behind a busier worker.
                if owner.load < owner.slots and owner.load - least.load <= max(2, owner.slots // 4):
                    return owner, "affinity", (depth + 1) * BLOCK_CHARS
                break
        return least, "balance", 0


def _candidates(model: str, workers: list[WorkerInfo]) -> list[Candidate]:
    out = []
    for w in workers:
        status = w.status_of(model)
        if status is not None and status.state == "ready" and w.state != "draining":
            kv = status.stats.kv_cache_usage if status.stats is not None else 0.0
            out.append(Candidate(w.worker_id, status.max_jobs or w.max_jobs, kv))
    return out
