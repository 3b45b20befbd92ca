"""Limits on what one request may send, each answered 413 with the setting that raises it.

Two layers. ``BodyLimit`` is a pure ASGI middleware: it refuses a body whose Content-Length is
over VLLAMA_MAX_REQUEST_BYTES before reading a byte, and counts the bytes of a body sent
without one (chunked) as they arrive, so no request makes the server buffer more than the
limit. File uploads (POST /v1/files) are exempt: they stream to their own, larger limit
(VLLAMA_MAX_UPLOAD_BYTES). ``RequestLimits`` holds the per-request limits the request models
check while turning a request into job specs (prompt size, messages, n), before anything is
enqueued: a prompt too large is refused by the API rather than tokenized by a worker.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body, openai_error
from common.errors import TooLarge
from common.settings import Settings

EXEMPT = frozenset({("POST", "/v1/files")})  # (method, path): bodies with a limit of their own
# Blob uploads (api/blob_routes.py) are model files, bounded by the free disk of the store.
EXEMPT_PREFIXES = (("POST", "/api/blobs/"),)


def body_too_large(limit: int) -> TooLarge:
    return TooLarge(f"the request body is larger than {limit} bytes; send less, or raise "
                    f"VLLAMA_MAX_REQUEST_BYTES on the server")


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, Content-Length or not."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in EXEMPT or any(
                scope["method"] == method and scope["path"].startswith(prefix) for method, prefix in EXEMPT_PREFIXES):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # Raised into whoever reads the body (a route: the error handlers answer 413).
                    raise body_too_large(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except TooLarge:
            if started:  # too late for a status; the connection just ends
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The 413 in the path's API family's error shape. The rest of the body is left unread:
        the server closes the connection after answering."""
        error = body_too_large(self.limit)
        body = openai_error(error.message, error.status) if scope["path"].startswith("/v1/") \
            else error_body(error.message)
        await JSONResponse(body, status_code=error.status, headers={"Connection": "close"})(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None


def install_body_limit(app: Any, settings: Settings) -> None:
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)


@dataclass(frozen=True)
class RequestLimits:
    """The settings' limits on one generation request; the request models call these."""

    prompt_bytes: int
    messages: int
    n: int
    image_bytes: int = 20 * 2**20
    images: int = 16

    @classmethod
    def of(cls, settings: Settings) -> RequestLimits:
        return cls(settings.max_prompt_bytes, settings.max_messages, settings.max_n, settings.max_image_bytes,
                   settings.max_images)

    def check_images(self, sizes: list[int]) -> None:
        """The request's images, by their decoded sizes."""
        if len(sizes) > self.images:
            raise TooLarge(f"the request has {len(sizes)} images, more than the {self.images} allowed; send fewer, "
                           "or raise VLLAMA_MAX_IMAGES on the server")
        if sum(sizes) > self.image_bytes:
            raise TooLarge(f"the request's images are {sum(sizes)} bytes together, more than the {self.image_bytes} "
                           "allowed; send smaller images, or raise VLLAMA_MAX_IMAGE_BYTES on the server")

    def check_messages(self, count: int) -> None:
        if count > self.messages:
            raise TooLarge(f"the request has {count} messages, more than the {self.messages} allowed; send fewer, "
                           "or raise VLLAMA_MAX_MESSAGES on the server")

    def check_n(self, n: int) -> None:
        if n > self.n:
            raise TooLarge(f"n is {n}, more than the {self.n} choices allowed per request; ask for fewer, "
                           "or raise VLLAMA_MAX_N on the server")

    def check_prompt(self, texts: Iterable[str], *json_parts: Any) -> None:
        """``texts`` (prompt, system, suffix, every message's text) and ``json_parts`` (tools,
        tool call arguments: they are rendered into the prompt too) together, in UTF-8 bytes."""
        size = 0
        for text in texts:
            size += len(text.encode("utf-8", errors="surrogatepass"))
            if size > self.prompt_bytes:
                break
        for part in json_parts:
            if size > self.prompt_bytes:
                break
            if part:
                size += len(json.dumps(part, ensure_ascii=False).encode("utf-8", errors="surrogatepass"))
        if size > self.prompt_bytes:
            raise TooLarge(f"the prompt is larger than {self.prompt_bytes} bytes (prompt, system, suffix and "
                           "the text of every message and tool, together); send less, or raise "
                           "VLLAMA_MAX_PROMPT_BYTES on the server")
