"""Uploads are checked while they stream in, and stored files have a total quota.

VLLAMA_MAX_UPLOAD_BYTES: a Content-Length past it is refused before the body is read; a
chunked body is cut as soon as the file passes it. VLLAMA_MAX_FILE_STORAGE_BYTES: uploads are
refused past it, the count follows deletes and expiry, two uploads at once cannot both take
the last room, and a batch's output is kept (and counted) even past it. Real Redis, real HTTP
(raw sockets where a client library would not send what is tested), the fake engine.
"""

from __future__ import annotations

import asyncio
import io
import json
from urllib.parse import urlparse

import openai
import pytest

from api.uploads import ENVELOPE_BYTES
from common import clock, keys
from tests.fake_stack import fake_stack
from tests.test_batches import chat_line, client_for, finished, jsonl

KIB = 1024
BOUNDARY = "vllamatestboundary"


async def stored_files(redis) -> list[bytes]:
    return sorted(await redis.keys("vllama:file:*") + await redis.keys("vllama:file-meta:*"))


async def nothing_stored(redis) -> None:
    assert await stored_files(redis) == []
    assert await redis.zcard(keys.FILES) == 0
    assert int(await redis.get(keys.FILE_BYTES) or 0) == 0


def form_head(filename: str = "in.jsonl") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


async def open_upload(base_url: str, **headers: str):
    """A raw connection with the headers of a multipart upload sent, the body still to come."""
    url = urlparse(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    lines = ["POST /v1/files HTTP/1.1", f"Host: {url.netloc}",
             f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
             *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    return reader, writer


async def read_response(reader) -> tuple[int, dict]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return status, json.loads(await reader.readexactly(length))


async def test_a_content_length_past_the_limit_is_refused_before_the_body(redis_server):
    async with fake_stack(redis_server.url, worker=False, max_upload_bytes=64 * KIB) as stack:
        reader, writer = await open_upload(stack.base_url, Content_Length=str(10 * 2**30))
        writer.write(form_head())  # the first bytes of ten GiB that never come
        await writer.drain()
        status, body = await asyncio.wait_for(read_response(reader), 20)
        assert status == 413
        message = body["error"]["message"]
        assert "VLLAMA_MAX_UPLOAD_BYTES" in message and "64 KiB" in message
        writer.close()
        await nothing_stored(stack.redis)


async def test_a_chunked_body_is_cut_at_the_limit(redis_server):
    limit = 256 * KIB
    async with fake_stack(redis_server.url, worker=False, max_upload_bytes=limit) as stack:
        reader, writer = await open_upload(stack.base_url, Transfer_Encoding="chunked")

        def chunk(data: bytes) -> bytes:
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        writer.write(chunk(form_head()))
        answer = asyncio.create_task(read_response(reader))
        sent, piece = 0, b"x" * (16 * KIB)
        while not answer.done() and sent < 40 * limit:  # ten MiB, unless the server stops us first
            writer.write(chunk(piece))
            await writer.drain()
            sent += len(piece)
            await asyncio.sleep(0.002)
        assert answer.done(), f"the server read all {sent} bytes without answering"
        status, body = await answer
        assert status == 413 and "VLLAMA_MAX_UPLOAD_BYTES" in body["error"]["message"]
        assert limit < sent < 20 * limit  # answered while the client was still sending
        writer.close()
        await nothing_stored(stack.redis)


async def test_the_file_itself_is_counted_whatever_the_form_around_it(redis_server):
    limit = 64 * KIB
    async with fake_stack(redis_server.url, worker=False, max_upload_bytes=limit) as stack:
        client = client_for(stack)
        kept = await client.files.create(file=("at.jsonl", io.BytesIO(b"a" * limit)), purpose="batch")
        assert kept.bytes == limit
        assert (await client.files.content(kept.id)).content == b"a" * limit
        await client.files.delete(kept.id)
        with pytest.raises(openai.APIStatusError) as over:
            await client.files.create(file=("over.jsonl", io.BytesIO(b"a" * (limit + 1))), purpose="batch")
        assert over.value.status_code == 413 and "VLLAMA_MAX_UPLOAD_BYTES" in over.value.message
        # A Content-Length within the form's allowance, but a file one byte too long: cut.
        reader, writer = await open_upload(stack.base_url, Content_Length=str(limit + ENVELOPE_BYTES))
        writer.write(form_head() + b"a" * (limit + 1))
        await writer.drain()
        status, _ = await asyncio.wait_for(read_response(reader), 20)
        assert status == 413
        writer.close()
        await nothing_stored(stack.redis)
        await client.close()


async def test_malformed_uploads_get_400_and_store_nothing(redis_server):
    async with fake_stack(redis_server.url, worker=False) as stack:
        async with stack.client() as http:
            r = await http.post("/v1/files", json={"file": "x", "purpose": "batch"})
            assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
            r = await http.post("/v1/files", data={"purpose": "batch"}, files={"other": ("a", b"x")})
            assert r.status_code == 400 and "`file`" in r.json()["error"]["message"]
            r = await http.post("/v1/files", files={"file": ("a.jsonl", b"x")})
            assert r.status_code == 400 and "purpose" in r.json()["error"]["message"]
            r = await http.post("/v1/files", content=b"--b\r\ngarbage", headers={
                "Content-Type": "multipart/form-data; boundary=b"})
            assert r.status_code == 400
            # A body that stops short of its closing boundary is not a file.
            r = await http.post("/v1/files", content=form_head() + b"partial", headers={
                "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
            assert r.status_code == 400 and "ended before" in r.json()["error"]["message"]
        await nothing_stored(stack.redis)


async def test_the_quota_follows_uploads_deletes_and_expiry(redis_server):
    async with fake_stack(redis_server.url, worker=False, max_file_storage_bytes=100 * KIB) as stack:
        client = client_for(stack)
        first = await client.files.create(file=("a.jsonl", io.BytesIO(b"a" * 60 * KIB)), purpose="batch")
        with pytest.raises(openai.APIStatusError) as full:
            await client.files.create(file=("b.jsonl", io.BytesIO(b"b" * 60 * KIB)), purpose="batch")
        message = full.value.message
        assert full.value.status_code == 413
        assert "60 KiB" in message and "100 KiB" in message and "VLLAMA_MAX_FILE_STORAGE_BYTES" in message
        assert "delete" in message
        assert [f.id for f in (await client.files.list()).data] == [first.id]  # the refused one left nothing
        # A Content-Length that cannot fit in the room left: refused before the body is read.
        reader, writer = await open_upload(stack.base_url, Content_Length=str(ENVELOPE_BYTES + 50 * KIB))
        writer.write(form_head())
        await writer.drain()
        status, body = await asyncio.wait_for(read_response(reader), 20)
        assert status == 413 and "at least 50 KiB" in body["error"]["message"]
        writer.close()

        await client.files.delete(first.id)
        second = await client.files.create(file=("b.jsonl", io.BytesIO(b"b" * 60 * KIB)), purpose="batch")
        assert int(await stack.redis.get(keys.FILE_BYTES)) == 60 * KIB

        # As when VLLAMA_FILE_TTL_S has passed: Redis drops the file, its expiry time is behind us.
        await stack.redis.delete(keys.file_content(second.id), keys.file_meta(second.id))
        await stack.redis.zadd(keys.FILE_EXPIRY, {second.id: int(clock.now()) - 1})
        third = await client.files.create(file=("c.jsonl", io.BytesIO(b"c" * 60 * KIB)), purpose="batch")
        assert int(await stack.redis.get(keys.FILE_BYTES)) == 60 * KIB
        assert await stack.redis.hkeys(keys.FILE_SIZES) == [third.id.encode()]
        with pytest.raises(openai.NotFoundError):
            await client.files.delete(second.id)
        assert int(await stack.redis.get(keys.FILE_BYTES)) == 60 * KIB  # not subtracted twice
        await client.close()


async def test_uploads_at_once_cannot_share_the_last_room(redis_server):
    async with fake_stack(redis_server.url, worker=False, max_file_storage_bytes=100 * KIB) as stack:
        async with stack.client() as http:
            async def upload(i: int) -> int:
                r = await http.post("/v1/files", data={"purpose": "batch"},
                                    files={"file": (f"{i}.jsonl", bytes([65 + i]) * 30 * KIB)})
                return r.status_code

            codes = await asyncio.gather(*(upload(i) for i in range(8)))
        assert sorted(codes) == [200] * 3 + [413] * 5
        assert int(await stack.redis.get(keys.FILE_BYTES)) == 90 * KIB
        assert len(await stack.redis.keys("vllama:file:*")) == 3


async def test_a_batch_output_past_the_quota_is_kept_and_counted(redis_server):
    limit = 8 * KIB
    async with fake_stack(redis_server.url, max_file_storage_bytes=limit) as stack:
        client = client_for(stack)
        rows = [chat_line(i) for i in range(20)]
        assert len(jsonl(rows)) < limit
        f = await client.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
        batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        done = (await finished(client, batch.id))[-1]
        assert done.status == "completed" and done.request_counts.completed == 20
        output = (await client.files.content(done.output_file_id)).text.splitlines()
        assert len(output) == 20  # every result kept, though the store is now past its limit
        used = int(await stack.redis.get(keys.FILE_BYTES))
        assert used > limit and used == sum(int(v) for v in await stack.redis.hvals(keys.FILE_SIZES))
        with pytest.raises(openai.APIStatusError) as full:
            await client.files.create(file=("more.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
        assert full.value.status_code == 413
        await client.files.delete(done.output_file_id)  # room again
        await client.files.create(file=("more.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
        await client.close()
