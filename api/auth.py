"""Optional bearer-token authentication (VLLAMA_API_KEY), off by default as in Ollama.

Every endpoint needs ``Authorization: Bearer <key>`` except ``/`` and ``/health``, which load
balancers and health checks call without credentials. OpenAI clients send their api_key this
way; Ollama clients take a ``headers`` argument.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from api.errors import error_response

OPEN_PATHS = frozenset({"/", "/health"})


def install_auth(app: FastAPI, api_key: str) -> None:
    if not api_key:
        return
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def _check(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            what = "a wrong API key" if given else "no API key"
            response = error_response(
                request, f"this server needs an API key and the request has {what}: send the header "
                         "'Authorization: Bearer <key>' with the key set in VLLAMA_API_KEY", 401)
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return await call_next(request)
