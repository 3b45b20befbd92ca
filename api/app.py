"""The API process: FastAPI app, its Redis connection and its shared pub/sub reader."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from arq.connections import ArqRedis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from api.auth import install_auth
from api.dispatch import Dispatcher
from api.anthropic_routes import router as anthropic_router
from api.embed_routes import router as embed_router
from api.errors import install_error_handlers
from api.openapi_bodies import install as install_openapi_bodies
from api.origins import install_browser_guard
from api.batches import router as batches_router
from api.blob_routes import router as blob_router
from api.files import router as files_router
from api.housekeeping import Housekeeping
from api import metrics
from api.replica_counts import ReplicaCounts
from api.jobs_routes import router as jobs_router
from api.limits import install_body_limit
from api.model_routes import router as model_router
from api.ollama_routes import router as ollama_router
from api.openai_routes import router as openai_router
from api.responses_routes import router as responses_router
from api.pubsub import FrameMultiplexer
from common.redis_conn import connect
from common import heap
from common.settings import Settings, get_settings

log = logging.getLogger(__name__)

# The Ollama version whose API we follow; clients gate features on it.
OLLAMA_API_VERSION = "0.12.0"


def create_app(settings: Settings | None = None, redis: ArqRedis | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if redis is None and not settings.redis_url:
            raise RuntimeError("VLLAMA_REDIS_URL is not set (or use `vllama serve`, which starts Redis)")
        conn = redis or await connect(settings.redis_url)
        mux = FrameMultiplexer(conn)
        await mux.start()
        app.state.redis = conn
        app.state.dispatcher = dispatcher = Dispatcher(conn, mux, settings)
        housekeeping = Housekeeping(conn, dispatcher.queue, settings)
        await housekeeping.start()
        app.state.replica_counts = counts = ReplicaCounts(conn, mux.api_id, app.state.request_counts,
                                                          app.state.key_requests)
        counts.start()
        heap.settle()  # the app is built: nothing made so far is garbage
        try:
            yield
        finally:
            await counts.stop()
            await housekeeping.stop()
            await mux.stop()
            if redis is None:
                await conn.aclose()

    app = FastAPI(title="vLLama", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    install_auth(app, settings)
    app.include_router(ollama_router)
    app.include_router(model_router)
    app.include_router(blob_router)
    app.include_router(openai_router)
    app.include_router(anthropic_router)
    app.include_router(responses_router)
    app.include_router(embed_router)
    app.include_router(jobs_router)
    app.include_router(files_router)
    app.include_router(batches_router)
    metrics.install(app)
    install_openapi_bodies(app)  # /openapi.json and /docs show every request and response body

    # HEAD too (Ollama answers it), kept out of the OpenAPI document: one operation per path.
    @app.head("/", response_class=PlainTextResponse, include_in_schema=False)
    @app.get("/", response_class=PlainTextResponse)
    async def root() -> str:
        return "Ollama is running"

    @app.head("/api/version", include_in_schema=False)
    @app.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": OLLAMA_API_VERSION}

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Ready when Redis answers and at least one worker is ready to generate. With keys
        configured, a request without a valid key learns only that (no hosts, workers or
        Redis errors: they map the deployment for an attacker)."""
        dispatcher: Dispatcher = request.app.state.dispatcher
        detail = not request.app.state.keys_configured or hasattr(request.state, "principal")
        try:
            await request.app.state.redis.ping()
            workers = await dispatcher.live_workers(fresh=True)
        except Exception as exc:  # noqa: BLE001 - any Redis failure means "cannot serve"
            if not detail:
                return JSONResponse({"status": "unavailable"}, 503)
            return JSONResponse({"status": "unavailable", "redis": f"error: {exc}", "workers": []}, 503)
        ready = [w for w in workers if w.state == "ready"]
        if not detail:
            return JSONResponse({"status": "ok" if ready else "unavailable"}, 200 if ready else 503)
        body = {
            "status": "ok" if ready else "unavailable",
            "redis": "ok",
            "workers": [w.model_dump(include={"worker_id", "host", "models", "state", "running", "max_jobs"})
                        for w in workers],
        }
        if not ready:
            body["reason"] = "no worker is ready; start one with `vllama worker` (or wait for it to load)"
        return JSONResponse(body, 200 if ready else 503)

    install_body_limit(app, settings)  # 413 past VLLAMA_MAX_REQUEST_BYTES, before any body is buffered
    # Last added runs first: Origin and Host are checked before authentication and any work.
    install_browser_guard(app, settings.origins, settings.host)
    return app


def create_app_from_env() -> FastAPI:
    """The app of each of the N processes of `vllama api --workers N`: uvicorn builds them
    from an import string in spawned processes, so their settings come from the environment,
    where the command put its own first (cli/parts.py). An app that cannot be built (a bad
    setting) ends the process with uvicorn's start-up failure status, which stops the
    manager; any other exit would have it start the process again, forever."""
    from uvicorn.config import STARTUP_FAILURE

    try:
        return create_app(Settings())
    except Exception as exc:  # noqa: BLE001 - whatever it is, it would fail the same way again
        log.error("this API process cannot start: %s", exc, exc_info=not isinstance(exc, ValueError))
        raise SystemExit(STARTUP_FAILURE) from None
