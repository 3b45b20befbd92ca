"""API keys (VLLAMA_API_KEYS, VLLAMA_API_KEY), off by default as in Ollama.

With keys configured every endpoint needs ``Authorization: Bearer <key>`` (or ``x-api-key:
<key>``, as Anthropic's clients send it) except ``/`` and ``/health``, which load balancers and
health checks call without credentials (/health then says only ok or not; with any valid key,
the detail). OpenAI clients send their api_key as a bearer token; Ollama clients take a
``headers`` argument.

The request's principal (common/api_keys.py) is put in ``request.state.principal``; without
keys there is none, and api/ownership.py reads that as the one anonymous owner. Requests are
counted per key name here (this replica's counts, like the HTTP counters in /metrics).

Plain ASGI, like the request counter: it must not buffer or delay streamed answers.
"""

from __future__ import annotations

from collections import Counter

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response
from common.api_keys import Principal, hash_key, load_keys
from common.settings import Settings

OPEN_PATHS = frozenset({"/", "/health"})


class KeyCheck:
    def __init__(self, app: ASGIApp, keys: dict[str, Principal], requests: Counter[str]) -> None:
        self.app = app
        self.keys = keys
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _given_key(scope)
        principal = self.keys.get(hash_key(given)) if given else None
        if principal is not None:
            scope.setdefault("state", {})["principal"] = principal
            self.requests[principal.name or ""] += 1
        elif scope["path"] not in OPEN_PATHS:
            request = Request(scope)
            what = "a wrong API key" if given else "no API key"
            response = error_response(
                request, f"this server needs an API key and the request has {what}: send the header "
                         "'Authorization: Bearer <key>' (or 'x-api-key: <key>') with a key from VLLAMA_API_KEYS "
                         "(or VLLAMA_API_KEY)", 401)
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _given_key(scope: Scope) -> str:
    """The bearer token, or else the x-api-key header (Anthropic's SDK sends its key so)."""
    api_key = ""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key":
            api_key = value.decode("latin-1").strip()
    return api_key


def install_auth(app: FastAPI, settings: Settings) -> None:
    """Check keys on every request, if any are configured (a bad keys file raises, naming the
    line: the settings check it first, so this is for callers that built Settings by hand)."""
    app.state.key_requests = Counter()
    app.state.keys_configured = False
    keys = load_keys(settings.api_keys, settings.api_key)
    if not keys:
        return
    app.state.keys_configured = True
    app.add_middleware(KeyCheck, keys=keys, requests=app.state.key_requests)
