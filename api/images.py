"""Images named by an http(s) URL (OpenAI's image_url and input_image parts, Anthropic's url
image sources), fetched by the API and sent on inline.

Off by default: fetching makes the server reach whatever address a client names (inside the
network too), so it is the operator's choice (VLLAMA_FETCH_IMAGES). Without it such a part
gets a 400 that says to send the image inline (api/openai_models.py and its kin). A fetch is
bounded in time and size (VLLAMA_MAX_IMAGE_BYTES); a failed one is the client's 400.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import httpx

from api.anthropic_models import MessagesRequest
from api.openai_models import ChatCompletionRequest, image_url_of
from api.responses_models import ResponsesRequest
from common.errors import BadRequest, TooLarge
from common.images import data_url, is_data_url
from common.settings import Settings

FETCH_TIMEOUT_S = 15.0


async def inline_remote_images(body: ChatCompletionRequest, settings: Settings) -> None:
    """Replace each http(s) image URL of ``body`` by the image it names, as a data: URL."""
    places = [(f"messages[{i}].content[{j}]", part) for i, message in enumerate(body.messages)
              for j, part in message.image_parts()]
    await _inline([(where, image_url_of(part, where), lambda data, part=part: part.update(
        image_url={"url": data_url(data)})) for where, part in places], settings)


async def inline_remote_inputs(body: ResponsesRequest, settings: Settings) -> None:
    """The same for the Responses API's input_image parts."""
    await _inline([(where, part.get("image_url"), lambda data, part=part: part.update(image_url=data_url(data)))
                   for where, part in body.image_parts()], settings)


async def inline_remote_sources(body: MessagesRequest, settings: Settings) -> None:
    """Replace each url source of ``body``'s image blocks (in tool results too) by the image
    it names, as a base64 source."""
    await _inline([(f"{where}.source.url", block["source"].get("url"), lambda data, block=block: block.update(
        source={"type": "base64", "media_type": _media_type(data), "data": base64.b64encode(data).decode("ascii")}))
        for where, block in _image_blocks(body) if block["source"].get("type") == "url"], settings)


async def _inline(places: list[tuple[str, object, Callable[[bytes], object]]], settings: Settings) -> None:
    """Fetch each (where, url, put) whose url is not a data: URL already, and ``put`` its bytes."""
    if not settings.fetch_images:
        return
    remote = [place for place in places if not (isinstance(place[1], str) and is_data_url(place[1]))]
    if not remote:
        return
    async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=True) as client:
        for where, url, put in remote:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise BadRequest(f"{where}: an image URL must be a data: URL or an http(s) URL")
            put(await _fetch(client, url, settings.max_image_bytes, where))


def _image_blocks(body: MessagesRequest) -> list[tuple[str, dict]]:
    found = []
    for i, message in enumerate(body.messages):
        for j, block in enumerate(message.content if isinstance(message.content, list) else []):
            where = f"messages[{i}].content[{j}]"
            inner = block.get("content") if block.get("type") == "tool_result" else None
            for k, part in enumerate(inner if isinstance(inner, list) else [block]):
                if isinstance(part, dict) and part.get("type") == "image" and isinstance(part.get("source"), dict):
                    found.append((where if inner is None else f"{where}.content[{k}]", part))
    return found


def _media_type(data: bytes) -> str:
    """The media type an Anthropic source names, from the image's first bytes (the fetched
    server's Content-Type is not trusted; common/images.py checks the bytes again)."""
    for signature, kind in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif")):
        if data.startswith(signature):
            return kind
    return "image/webp"


async def _fetch(client: httpx.AsyncClient, url: str, limit: int, where: str) -> bytes:
    shown = url if len(url) <= 100 else url[:97] + "..."
    try:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise BadRequest(f"{where}: fetching the image at {shown} answered HTTP {response.status_code}")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > limit:
                    raise TooLarge(f"{where}: the image at {shown} is larger than {limit} bytes; send a smaller "
                                   "one, or raise VLLAMA_MAX_IMAGE_BYTES on the server")
            return bytes(data)
    except httpx.HTTPError as exc:
        raise BadRequest(f"{where}: the image at {shown} could not be fetched ({exc})") from None
