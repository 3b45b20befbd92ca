"""Bodies that are not what an endpoint takes, sent to every endpoint that reads one: each is a
4xx with a message that says what is wrong (never a 5xx, never a hang), and the server still
serves afterwards. Plus what must keep working: a JSON body under a form-encoded
Content-Type, as ``curl -d`` sends it (Ollama accepts that).

Real HTTP against the whole stack with the fake engine (tests/fake_stack.py); the bodies whose
framing is broken (a Content-Length larger than what is sent) go over a raw socket.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest

from api.openapi_bodies import OPERATIONS
from cli.embedded_redis import free_port
from tests.fake_stack import MODEL, fake_stack
from tests.hub_standin import isolate_hf_client
from tests.model_factory import write_model

pytestmark = pytest.mark.asyncio(loop_scope="session")

WAIT_S = 30  # far more than any answer takes (the clients time out after it too); past it, a hang
FORM = "application/x-www-form-urlencoded"

# Every operation whose body the route parses as JSON (api/openapi_bodies.py's table).
JSON_ENDPOINTS = sorted((method.upper(), path) for (method, path), op in OPERATIONS.items() if op.body is not None)

# Bodies that are not a JSON object, or not JSON at all. Each with "stream": true where it can
# hold it, so the streaming answer is never started on a bad body.
BAD_BODIES: dict[str, bytes] = {
    "empty": b"",
    "whitespace": b" \n\t ",
    "malformed": b'{"model": "' + MODEL.encode() + b'", "stream": true,,}',
    "truncated": b'{"model": "' + MODEL.encode() + b'", "stream": true, "prompt": "hel',
    "truncated in a key": b'{"model": "' + MODEL.encode() + b'", "stre',
    "single quotes": b"{'model': 'x', 'stream': true}",
    "list": b'[{"model": "' + MODEL.encode() + b'", "stream": true}]',
    "empty list": b"[]",
    "string": b'"' + MODEL.encode() + b'"',
    "number": b"42",
    "float": b"1e999",
    "null": b"null",
    "true": b"true",
    "nested lists": b"[" * 100_000,
    "nested lists, closed": b"[" * 100_000 + b"]" * 100_000,
    "nested objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "nested in a field": b'{"model": "' + MODEL.encode() + b'", "stream": true, "options": ' + b"[" * 100_000,
    "invalid UTF-8": b'{"model": "\xff\xfe\xfa", "stream": true, "prompt": "\xc3\x28"}',
    "invalid UTF-8 outside strings": b'{"model": "x", "stream": true}\xff',
    "lone surrogate escape": b'{"model": "\\ud800", "stream": true, "prompt": "\\udfff"}',
    "NUL bytes": b'{"model": "x\x00", "stream": true}\x00',
    "two objects": b'{"model": "x", "stream": true}{"model": "y"}',
    "NDJSON": b'{"model": "x", "stream": true}\n{"model": "y"}\n',
    "BOM": b'\xef\xbb\xbf{"model": "x", "stream": true, "prompt": "hi"}',
    "form fields": b"model=x&stream=true&prompt=hi",
}


def _message(response: httpx.Response, path: str) -> str:
    """The error message, in the shape the path promises (OpenAI's under /v1/)."""
    body = response.json()
    message = body["error"]["message"] if path.startswith("/v1/") else body["error"]
    assert isinstance(message, str) and len(message) > 10, body
    return message


async def _healthy(http: httpx.AsyncClient) -> None:
    """Still serving, and never answered 5xx, even to a client that was gone (the server's
    own count, /metrics, sees what no client read)."""
    metrics = (await http.get("/metrics")).text.splitlines()
    server_errors = [line for line in metrics if line.startswith("vllama_http_requests_total") and 'status="5' in line]
    assert not server_errors, server_errors
    assert (await http.get("/health")).status_code == 200
    r = await http.post("/api/generate", json={"model": MODEL, "prompt": "still there?", "stream": False})
    assert r.status_code == 200 and r.json()["done"] is True, r.text


@pytest.fixture
async def stack(redis_server, tmp_path, monkeypatch):
    isolate_hf_client(monkeypatch, tmp_path / "hf_home")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    write_model(tmp_path / "home", MODEL)
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path / "home", auto_pull="off") as s:
        yield s


async def test_every_bad_body_on_every_endpoint_is_a_clear_4xx(stack):
    failures = []
    async with stack.client() as http:
        for method, path in JSON_ENDPOINTS:
            for name, body in BAD_BODIES.items():
                for content_type in ("application/json", FORM):
                    r = await http.request(method, path, content=body, headers={"Content-Type": content_type})
                    if not 400 <= r.status_code < 500:
                        failures.append(f"{method} {path} {name} ({content_type}): {r.status_code} {r.text[:200]}")
                        continue
                    _message(r, path)
        await _healthy(http)
    assert not failures, "\n".join(failures)


async def test_what_the_messages_say(stack):
    """The messages name the problem, so a person knows what to fix."""
    async with stack.client() as http:
        for method, path in JSON_ENDPOINTS:
            said = {name: _message(await http.request(method, path, content=BAD_BODIES[name]), path).lower()
                    for name in ("empty", "malformed", "truncated", "list", "number", "nested lists",
                                 "invalid UTF-8")}
            where = f"{method} {path}: {said}"
            assert "body" in said["empty"] or "required" in said["empty"], where
            for name in ("malformed", "truncated", "nested lists"):
                assert "json" in said[name], where
            assert "object" in said["list"] and "object" in said["number"], where
            assert "utf-8" in said["invalid UTF-8"] or "json" in said["invalid UTF-8"] \
                or "unicode" in said["invalid UTF-8"], where
            assert "/" not in said["nested lists"].replace("n/a", ""), f"a local path in {where}"


async def test_bodies_sent_in_chunks(stack):
    """The same bad bodies, streamed with chunked transfer encoding (no Content-Length)."""

    def chunks(body: bytes) -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 7001):
                yield body[i:i + 7001]
        return gen()

    failures = []
    async with stack.client() as http:
        for method, path in JSON_ENDPOINTS:
            for name in ("malformed", "truncated", "list", "nested lists", "invalid UTF-8", "empty"):
                r = await http.request(method, path, content=chunks(BAD_BODIES[name]))
                if not 400 <= r.status_code < 500:
                    failures.append(f"{method} {path} {name}: {r.status_code} {r.text[:200]}")
        await _healthy(http)
    assert not failures, "\n".join(failures)


async def _raw(base_url: str, head: bytes, sent: bytes, *, close_write: bool) -> bytes:
    """Send a request whose body is shorter than its Content-Length, then either half-close
    (the client is done sending) or close outright; what came back, if anything."""
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(head + sent)
        await writer.drain()
        if not close_write:
            writer.close()
            await writer.wait_closed()
            return b""
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), WAIT_S)
    finally:
        writer.close()


async def test_content_length_larger_than_the_body_never_5xx_nor_hangs(stack):
    """The client promises more than it sends and stops: the server answers 4xx or closes,
    and stays healthy; it never answers 500."""
    failures = []
    sent = b'{"model": "' + MODEL.encode() + b'", "stream": true, "prompt": "hel'
    for method, path in JSON_ENDPOINTS:
        for close_write in (True, False):
            head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(sent) + 1000}\r\n\r\n").encode()
            answer = await _raw(stack.base_url, head, sent, close_write=close_write)
            status = answer.split(b"\r\n", 1)[0]
            if answer and not (status.startswith(b"HTTP/1.1 4")):
                failures.append(f"{method} {path} (half-closed: {close_write}): {answer[:300]!r}")
    async with stack.client() as http:
        await _healthy(http)
    assert not failures, "\n".join(failures)


async def test_json_under_a_form_content_type_still_works(stack):
    """``curl -d '{...}'`` sends Content-Type: application/x-www-form-urlencoded: the body is
    read as JSON all the same, streaming or not."""
    async with stack.client() as http:
        upload = await http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", json.dumps(
            {"custom_id": "a", "method": "POST", "url": "/v1/completions",
             "body": {"model": MODEL, "prompt": "hi"}}).encode() + b"\n")})
        assert upload.status_code == 200, upload.text
        chat = [{"role": "user", "content": "hi"}]
        cases = [
            ("POST", "/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}, 200),
            ("POST", "/api/generate", {"model": MODEL, "prompt": "hi", "stream": True}, 200),
            ("POST", "/api/chat", {"model": MODEL, "messages": chat, "stream": False}, 200),
            ("POST", "/api/chat", {"model": MODEL, "messages": chat}, 200),
            ("POST", "/api/show", {"model": MODEL}, 200),
            ("POST", "/api/copy", {"source": MODEL, "destination": "copied:1b"}, 200),
            ("DELETE", "/api/delete", {"model": "copied:1b"}, 200),
            ("POST", "/api/create", {"model": "made:1b", "from": MODEL, "system": "Be brief.", "stream": False}, 200),
            ("POST", "/api/pull", {"model": "no-such-model-anywhere", "stream": False}, 404),
            ("POST", "/api/push", {"model": "you/no-such-model", "stream": False}, 404),
            ("POST", "/api/embed", {"model": MODEL, "input": []}, 200),
            ("POST", "/api/embeddings", {"model": MODEL, "prompt": ""}, 200),
            # Parsed, and refused for what it asks: the fake model generates, it does not embed.
            ("POST", "/v1/embeddings", {"model": MODEL, "input": "hi"}, 400),
            ("POST", "/v1/chat/completions", {"model": MODEL, "messages": chat}, 200),
            ("POST", "/v1/chat/completions", {"model": MODEL, "messages": chat, "stream": True}, 200),
            ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi"}, 200),
            ("POST", "/v1/responses", {"model": MODEL, "input": "hi", "stream": True}, 200),
            ("POST", "/v1/messages", {"model": MODEL, "messages": chat, "max_tokens": 4}, 200),
            ("POST", "/v1/messages/count_tokens", {"model": MODEL, "messages": chat}, 200),
            ("POST", "/api/jobs/generate", {"model": MODEL, "prompt": "hi"}, 202),
            ("POST", "/api/jobs/chat", {"model": MODEL, "messages": chat}, 202),
            ("POST", "/api/jobs/pull", {"model": MODEL}, 202),
            ("POST", "/v1/batches", {"input_file_id": upload.json()["id"], "endpoint": "/v1/completions",
                                     "completion_window": "24h"}, 200),
        ]
        assert {(m, p) for m, p, _, _ in cases} == set(JSON_ENDPOINTS)
        for method, path, body, status in cases:
            r = await http.request(method, path, content=json.dumps(body), headers={"Content-Type": FORM})
            assert r.status_code == status, (method, path, r.text)
            if path in ("/api/generate", "/api/chat") and body.get("stream", True):  # Ollama streams by default
                assert r.headers["content-type"].startswith("application/x-ndjson"), r.headers
                assert json.loads(r.text.splitlines()[-1])["done"] is True
            elif path.startswith("/v1/") and body.get("stream"):
                assert r.headers["content-type"].startswith("text/event-stream"), r.headers
                last = "event: response.completed" if path == "/v1/responses" else "data: [DONE]"
                assert last in r.text.rstrip().split("\n\n")[-1], r.text


async def test_bad_uploads_are_4xx(stack):
    """/v1/files reads multipart, not JSON: broken forms are 4xx too, and nothing is stored."""
    boundary = "b0undary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n{{}}\r\n").encode()
    bodies = {
        "empty": (b"", f"multipart/form-data; boundary={boundary}"),
        "JSON": (b'{"purpose": "batch"}', "application/json"),
        "no boundary": (part, "multipart/form-data"),
        "truncated": (part[:-30], f"multipart/form-data; boundary={boundary}"),
        "no closing boundary": (part, f"multipart/form-data; boundary={boundary}"),
        "wrong boundary": (part + f"--{boundary}--\r\n".encode(), "multipart/form-data; boundary=other"),
        "garbage": (b"\xff\xfe" * 1000, f"multipart/form-data; boundary={boundary}"),
        "nested lists": (b"[" * 100_000, f"multipart/form-data; boundary={boundary}"),
    }
    failures = []
    async with stack.client() as http:
        for name, (body, content_type) in bodies.items():
            r = await http.post("/v1/files", content=body, headers={"Content-Type": content_type})
            if not 400 <= r.status_code < 500:
                failures.append(f"{name}: {r.status_code} {r.text[:200]}")
                continue
            _message(r, "/v1/files")
        assert (await http.get("/v1/files")).json()["data"] == []
        await _healthy(http)
    assert not failures, "\n".join(failures)
