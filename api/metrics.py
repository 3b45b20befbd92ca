"""GET /metrics: Prometheus's text format.

Everything but the HTTP counters comes from Redis, so every API replica shows the same
cluster-wide picture: queue lengths per model and class, and each live worker's numbers per
model from its heartbeat (jobs, tokens, time to first token and per output token, and vLLM's
own running/waiting/KV-cache figures). The HTTP counters are this replica's (all processes of
`vllama api --workers N`, api/replica_counts.py); Prometheus sums them across replicas.
"""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import ownership
from api.dispatch import Dispatcher
from common import catalog, keys
from common.metrics import Exposition

router = APIRouter(tags=["metrics"])


class RequestCounter:
    """ASGI middleware counting requests by method, route (its template, so ids do not blow up
    the label space) and status. Plain ASGI: it must not buffer or delay streamed answers."""

    def __init__(self, app: ASGIApp, counts: Counter[tuple[str, str, int]]) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")  # set by the router on this same scope
            self.counts[(scope["method"], getattr(route, "path", "unmatched"), status)] += 1


def install(app: FastAPI) -> None:
    app.state.request_counts = Counter()
    app.add_middleware(RequestCounter, counts=app.state.request_counts)
    app.include_router(router)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    d: Dispatcher = request.app.state.dispatcher
    out = Exposition()
    counts, key_requests = await request.app.state.replica_counts.totals()
    out.family("vllama_http_requests_total", "counter", "HTTP requests answered by this API replica",
               [({"method": m, "endpoint": e, "status": str(s)}, n) for (m, e, s), n in sorted(counts.items())])

    await _per_key(request, out, key_requests)

    workers = await d.live_workers(fresh=True)
    out.family("vllama_workers_alive", "gauge", "generation workers with a live heartbeat", [({}, len(workers))])
    await _queues(d, out, {m for w in workers for m in w.models})

    per_model = [(w, m) for w in workers for m in w.loaded if m.stats is not None]

    def labelled(value_of):
        return [({"worker": w.worker_id, "model": m.name}, value_of(m)) for w, m in per_model]

    out.family("vllama_jobs_running", "gauge", "jobs a worker is running, per model", labelled(lambda m: m.running))
    out.family("vllama_job_slots", "gauge", "jobs a worker may run at once, per model", labelled(lambda m: m.max_jobs))
    out.family("vllama_jobs_total", "counter", "jobs ended since the model was loaded, by status",
               [({"worker": w.worker_id, "model": m.name, "status": status}, n)
                for w, m in per_model for status, n in m.stats.jobs.items()])
    out.family("vllama_prompt_tokens_total", "counter", "prompt tokens processed",
               labelled(lambda m: m.stats.prompt_tokens))
    out.family("vllama_generated_tokens_total", "counter", "tokens generated",
               labelled(lambda m: m.stats.generated_tokens))
    out.histogram("vllama_time_to_first_token_seconds",
                  "from a request's arrival to its first token, the time it waited in the queue included",
                  labelled(lambda m: m.stats.ttft))
    out.histogram("vllama_queue_wait_seconds", "from a request's arrival to a worker starting it",
                  labelled(lambda m: m.stats.queue_wait))
    out.histogram("vllama_time_per_output_token_seconds", "between output tokens, per job",
                  labelled(lambda m: m.stats.tpot))
    out.family("vllama_engine_requests_running", "gauge", "requests vLLM's scheduler is running",
               labelled(lambda m: m.stats.engine_running))
    out.family("vllama_engine_requests_waiting", "gauge", "requests waiting in vLLM's scheduler",
               labelled(lambda m: m.stats.engine_waiting))
    out.family("vllama_engine_kv_cache_usage_ratio", "gauge", "share of vLLM's KV cache in use (0-1)",
               labelled(lambda m: m.stats.kv_cache_usage))
    out.family("vllama_prefix_cache_queries_total", "counter", "prompt tokens looked up in vLLM's prefix cache",
               labelled(lambda m: m.stats.prefix_cache_queries))
    out.family("vllama_prefix_cache_hits_total", "counter", "prompt tokens found in vLLM's prefix cache",
               labelled(lambda m: m.stats.prefix_cache_hits))
    await _routes(d, out, workers)
    return Response(out.text(), media_type=Exposition.CONTENT_TYPE)


async def _routes(d: Dispatcher, out: Exposition, workers: list) -> None:
    """Routing decisions per worker, model and reason (api/routing.py), the whole cluster's."""
    async with d.redis.pipeline(transaction=False) as pipe:
        for w in workers:
            pipe.hgetall(keys.route_counts(w.worker_id))
        counts = await pipe.execute()
    samples = []
    for w, fields in zip(workers, counts):
        for field, n in sorted(fields.items()):
            model, _, reason = field.decode().partition("\t")
            samples.append(({"worker": w.worker_id, "model": model, "reason": reason}, int(n)))
    out.family("vllama_route_decisions_total", "counter", "jobs routed to a worker, by why (balance or affinity)",
               samples)


async def _per_key(request: Request, out: Exposition, key_requests: Counter[str]) -> None:
    """Usage per API key: requests (this replica's, like the HTTP counters) and tokens (the
    whole cluster's, added by workers as jobs end). Labelled by key name only, so the series
    are bounded by the keys file. An admin key sees every key's; another key its own."""
    if not request.app.state.keys_configured:
        return
    redis = request.app.state.dispatcher.redis
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.KEY_PROMPT_TOKENS)
        pipe.hgetall(keys.KEY_GENERATED_TOKENS)
        prompt, generated = await pipe.execute()
    principal = ownership.principal_of(request)

    def samples(counts: dict) -> list[tuple[dict[str, str], float]]:
        named = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in counts.items()}
        return [({"key": name}, n) for name, n in sorted(named.items()) if ownership.can_see(principal, name)]

    out.family("vllama_key_requests_total", "counter", "HTTP requests made with each API key, on this API replica",
               samples(key_requests))
    out.family("vllama_key_prompt_tokens_total", "counter",
               "prompt tokens processed for each API key (per job: each of n choices reads its prompt)", samples(prompt))
    out.family("vllama_key_generated_tokens_total", "counter", "tokens generated for each API key", samples(generated))


async def _queues(d: Dispatcher, out: Exposition, served: set[str]) -> None:
    """Jobs in each model's queues (waiting and running: arq keeps a job there until it ends),
    for every model that is served, on disk or asked for."""
    models = served | set(await catalog.entries(d.redis))
    models |= {m.decode() if isinstance(m, bytes) else m for m in await d.redis.zrange(keys.LOADS, 0, -1)}
    names = sorted(models)
    async with d.redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.zcard(keys.generation_queue(name))
            pipe.zcard(keys.batch_queue(name))
        sizes = await pipe.execute()
    out.family("vllama_queue_jobs", "gauge", "jobs in a model's queue, waiting or running, by class",
               [({"model": name, "class": cls}, sizes[2 * i + j])
                for i, name in enumerate(names) for j, cls in enumerate(("interactive", "batch"))])
