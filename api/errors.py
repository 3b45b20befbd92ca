"""The one mapping from errors to HTTP: status code plus Ollama's ``{"error": "..."}`` body."""

from __future__ import annotations

import json
import logging
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from starlette.requests import ClientDisconnect

from common.errors import BadRequest, VllamaError
from common.redact import without_paths

log = logging.getLogger(__name__)


def error_body(message: str) -> dict[str, str]:
    return {"error": message}


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 499: "invalid_request_error"}


def openai_error(message: str, status: int, code: str | None = None) -> dict[str, dict[str, object]]:
    """OpenAI's error object; its clients read ``error.message`` and the HTTP status."""
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = "model_not_found" if code == "model_not_found" or (code is None and status == 404) else None
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error(message: str, status: int) -> dict[str, object]:
    """Anthropic's error object; its SDK reads ``error.message`` and the HTTP status."""
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(request: Request, message: str, status: int, code: str | None = None) -> JSONResponse:
    """Ollama's ``{"error": "..."}``; under /v1/, OpenAI's error object, or Anthropic's for the
    Messages API."""
    path = request.url.path
    if path.startswith("/v1/messages"):
        body: dict[str, object] = anthropic_error(message, status)
    elif path.startswith("/v1/"):
        body = openai_error(message, status, code)
    else:
        body = error_body(message)
    return JSONResponse(body, status_code=status)


_SHOWN_PROBLEMS = 5  # a body with a million bad items gets a short answer, not a million lines
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "bytes", "none"})


def _is_union_tag(part: object) -> bool:
    """pydantic names the branch of a union it tried ("str", "list[str]", "NamedToolChoice") in
    an error's location; the person who sent the field knows it by its name alone."""
    return isinstance(part, str) and (part in _TYPE_NAMES or "[" in part or "(" in part or part[:1].isupper())


def describe_validation_error(exc: RequestValidationError | ValidationError) -> str:
    """Turn pydantic's error list into one sentence a person can act on: each wrong field
    named (a union's failed branches merged into one entry), at most a few of them."""
    problems: dict[str, list[tuple[bool, str]]] = {}
    for err in exc.errors():
        kind = err.get("type", "")
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body" and not _is_union_tag(p))
        if kind == "json_invalid":
            return f"invalid JSON in request body: {err.get('ctx', {}).get('error', err.get('msg'))}"
        if kind == "model_type" and not loc:
            return "request body must be a JSON object"
        if kind == "missing" and not loc:
            return "missing request body"
        msg = str(err.get("msg", "invalid value"))
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        ours = kind == "value_error"  # our own check's message says more than "should be a valid X"
        found = problems.setdefault(loc, [])
        if ours and not any(o for o, _ in found):
            found.clear()
        if (ours or not any(o for o, _ in found)) and (ours, msg) not in found:
            found.append((ours, msg))
    parts = []
    for loc, found in list(problems.items())[:_SHOWN_PROBLEMS]:
        msg = " or ".join(m if i == 0 else m[:1].lower() + m[1:] for i, (_, m) in enumerate(found))
        parts.append(f"{loc}: {msg}" if loc and loc not in msg else msg)
    if len(problems) > _SHOWN_PROBLEMS:
        parts.append(f"and {len(problems) - _SHOWN_PROBLEMS} more")
    return "; ".join(parts) or "invalid request"


REDIS_FULL = ("the server's Redis is full (maxmemory): delete files or batches you no longer need, or raise "
              "VLLAMA_REDIS_MAXMEMORY (or the shared Redis's maxmemory); then retry")


def redis_full(exc: BaseException) -> bool:
    """Redis refused a write at its maxmemory (policy noeviction). Nothing was written: a
    refused command changes nothing, and a Lua script is refused at its first write (so our
    scripts write first what a full Redis must refuse). Redis 6.2 reports a script's refusal
    as a plain script error, hence the look at the message too."""
    return isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, ResponseError) and "command not allowed when used memory > 'maxmemory'" in str(exc))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(VllamaError)
    async def _vllama_error(request: Request, exc: VllamaError) -> JSONResponse:
        return error_response(request, exc.message, exc.status, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, describe_validation_error(exc), 400)

    @app.exception_handler(ValidationError)
    async def _body_error(request: Request, exc: ValidationError) -> JSONResponse:
        return error_response(request, describe_validation_error(exc), 400)

    @app.exception_handler(RedisError)
    async def _redis_error(request: Request, exc: RedisError) -> JSONResponse:
        if redis_full(exc):
            log.error("Redis refused a write: %s", exc)
            return error_response(request, REDIS_FULL, 507)
        log.error("Redis error: %s", exc)
        return error_response(request, f"the server cannot reach its Redis ({exc}); check that Redis is up "
                                       "and VLLAMA_REDIS_URL points to it, then retry", 503)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(request, f"internal error: {without_paths(str(exc))}", 500)

    @app.exception_handler(json.JSONDecodeError)
    async def _json_error(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(request, f"invalid JSON in request body: {exc}", 400)

    @app.exception_handler(ClientDisconnect)
    async def _body_cut_short(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client stopped sending before the end of the body it announced: its mistake, not
        # ours (no 500, no traceback); it has most likely gone and never reads this.
        return error_response(request, "the request body ended before its Content-Length; send the whole body", 400)


M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M]) -> M:
    """Parse a JSON body whatever its Content-Type: Ollama accepts ``curl -d`` (form-encoded
    header, JSON body), so we must too."""
    raw = await request.body()
    if not raw.strip():
        raise BadRequest("missing request body")
    return model.model_validate_json(raw)
