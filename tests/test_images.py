"""Images through the real stack with the fake engine: both APIs' forms, what reaches the
engine, the limits and the errors (the real path, vLLM and a vision model, is in
tests/e2e/test_images.py)."""

from __future__ import annotations

import base64
import io
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import ollama
import openai
import pytest
from PIL import Image

from tests.fake_stack import MODEL, fake_stack
from workers.fake_engine import FakeEngine


def png(width: int, height: int, color: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress: about 3 bytes a pixel."""
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def vision_stack(redis_server, **settings):
    return fake_stack(redis_server.url, engine=FakeEngine(vision=True), **settings)


async def test_ollama_images_reach_the_engine_in_order(redis_server):
    async with vision_stack(redis_server) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "what is this?", "stream": False,
                                                   "images": [b64(png(4, 3)), b64(png(5, 2))]})
        assert r.status_code == 200, r.text
        assert [image.size for image in stack.engine.last_images] == [(4, 3), (5, 2)]
        # The template gets a placeholder per image, then the text, as vision templates take them.
        assert stack.engine.last_chat[0][-1]["content"] == [{"type": "image"}, {"type": "image"},
                                                            {"type": "text", "text": "what is this?"}]

        messages = [{"role": "user", "content": "first", "images": [b64(png(2, 2))]},
                    {"role": "assistant", "content": "a square"},
                    {"role": "user", "content": "and this?", "images": [b64(png(8, 1, "blue"))]}]
        r = await ollama.AsyncClient(host=stack.base_url).chat(model=MODEL, messages=messages)
        assert r.message.content
        assert [image.size for image in stack.engine.last_images] == [(2, 2), (8, 1)]
        assert stack.engine.last_images[1].getpixel((0, 0)) == (0, 0, 255)


async def test_openai_image_url_parts(redis_server):
    async with vision_stack(redis_server) as stack:
        client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused")
        content = [{"type": "text", "text": "compare "},
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png(3, 3))}},
                   {"type": "text", "text": "with"},
                   {"type": "image_url", "image_url": {"url": "data:;base64," + b64(png(6, 6)), "detail": "low"}}]
        r = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}])
        assert r.choices[0].message.content
        assert [image.size for image in stack.engine.last_images] == [(3, 3), (6, 6)]
        assert stack.engine.last_chat[0][-1]["content"][-1] == {"type": "text", "text": "compare with"}

        with pytest.raises(openai.BadRequestError, match="VLLAMA_FETCH_IMAGES"):
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]}])
        await client.close()


async def test_a_model_without_vision_refuses_images_with_ollamas_text(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/api/chat", json={"model": MODEL, "messages": [
            {"role": "user", "content": "hi", "images": [b64(png(2, 2))]}]})
        assert (r.status_code, r.json()["error"]) == (400, f'"{MODEL}" does not support vision')
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False})
        assert r.status_code == 200  # the same model, without an image


@pytest.mark.parametrize(("image", "status", "text"), [
    ("not base64!", 400, "not valid base64"),
    (b64(b"GIF89a but really text"[:3] + b"xx"), 400, "is not a PNG, JPEG, WebP, GIF or BMP image"),
    (b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), 400, "could not be read"),  # a PNG's signature, no PNG
    (b64(noise_png(40, 40)), 413, "VLLAMA_MAX_IMAGE_BYTES"),
])
async def test_bad_and_oversized_images_are_clear_errors(redis_server, image, status, text):
    async with vision_stack(redis_server, max_image_bytes=1024) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "images": [image]})
        assert r.status_code == status and text in r.json()["error"], r.text
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False,
                                                   "images": [b64(png(2, 2))] * 17})
        assert r.status_code == 413 and "VLLAMA_MAX_IMAGES" in r.json()["error"]
        # Nothing else was harmed: the next request runs.
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False,
                                                   "images": [b64(png(2, 2))]})
        assert r.status_code == 200


class _Images(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the handler's API
        if self.path == "/cat.png":
            data = png(7, 5)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_error(404)

    def log_message(self, *_) -> None:
        pass


@pytest.fixture
def image_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


async def test_http_image_urls_are_fetched_when_allowed(redis_server, image_server):
    async with vision_stack(redis_server, fetch_images=True) as stack, stack.client() as http:
        def ask(url: str) -> dict:
            return {"model": MODEL, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": url}]}]}

        r = await http.post("/v1/chat/completions", json=ask(f"{image_server}/cat.png"))
        assert r.status_code == 200, r.text
        assert [image.size for image in stack.engine.last_images] == [(7, 5)]
        r = await http.post("/v1/chat/completions", json=ask(f"{image_server}/missing.png"))
        assert r.status_code == 400 and "HTTP 404" in r.json()["error"]["message"]
