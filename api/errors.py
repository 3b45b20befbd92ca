"""The one mapping from errors to HTTP: status code plus Ollama's ``{"error": "..."}`` body."""

from __future__ import annotations

import json
import logging
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from common.errors import BadRequest, VllamaError

log = logging.getLogger(__name__)


def error_body(message: str) -> dict[str, str]:
    return {"error": message}


def describe_validation_error(exc: RequestValidationError | ValidationError) -> str:
    """Turn pydantic's error list into one sentence a person can act on."""
    parts = []
    for err in exc.errors():
        kind = err.get("type", "")
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if kind == "json_invalid":
            return f"invalid JSON in request body: {err.get('ctx', {}).get('error', err.get('msg'))}"
        if kind == "model_type" and not loc:
            return "request body must be a JSON object"
        if kind == "missing" and not loc:
            return "missing request body"
        msg = err.get("msg", "invalid value")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(VllamaError)
    async def _vllama_error(_: Request, exc: VllamaError) -> JSONResponse:
        return JSONResponse(error_body(exc.message), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(describe_validation_error(exc)), status_code=400)

    @app.exception_handler(ValidationError)
    async def _body_error(_: Request, exc: ValidationError) -> JSONResponse:
        return JSONResponse(error_body(describe_validation_error(exc)), status_code=400)

    @app.exception_handler(RedisError)
    async def _redis_error(_: Request, exc: RedisError) -> JSONResponse:
        log.error("Redis error: %s", exc)
        return JSONResponse(
            error_body(f"the server cannot reach its Redis ({exc}); check that Redis is up and "
                       "VLLAMA_REDIS_URL points to it, then retry"),
            status_code=503,
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {exc}"), status_code=500)

    @app.exception_handler(json.JSONDecodeError)
    async def _json_error(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return JSONResponse(error_body(f"invalid JSON in request body: {exc}"), status_code=400)


M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M]) -> M:
    """Parse a JSON body whatever its Content-Type: Ollama accepts ``curl -d`` (form-encoded
    header, JSON body), so we must too."""
    raw = await request.body()
    if not raw.strip():
        raise BadRequest("missing request body")
    return model.model_validate_json(raw)
