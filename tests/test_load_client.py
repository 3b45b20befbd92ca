"""The benchmark's lean HTTP client (cli/load_client.py): what it reads from a streamed answer
must be the answer, however the bytes are split between reads."""

from __future__ import annotations

import asyncio
import itertools
import json
import random

import pytest

from cli.load_client import TAIL_BYTES, StreamClient, _Connection


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
LINES = [json.dumps({"response": f"token {i}", "done": False}).encode() + b"\n" for i in range(50)]
FINAL = json.dumps({"done": True, "eval_count": 50}).encode() + b"\n"


class _Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def _fed(response: bytes, cuts: list[int]):
    """A connection given ``response`` in pieces cut at ``cuts``; returns (future, connection)."""
    connection = _Connection()
    connection.connection_made(_Transport())
    done = connection.post(b"POST / HTTP/1.1\r\n\r\n")
    edges = [0, *sorted(cuts), len(response)]
    for start, end in itertools.pairwise(edges):
        if end > start:
            connection.data_received(response[start:end])
    return done, connection


async def test_a_chunked_answer_is_read_whole_however_its_bytes_are_split():
    body = b"".join(LINES) + FINAL
    response = HEAD + chunked(*LINES, FINAL)
    rng = random.Random(7)
    for cuts in [[], list(range(1, len(response))), *([rng.randrange(1, len(response)) for _ in range(12)]
                                                       for _ in range(200))]:
        done, connection = _fed(response, cuts)
        assert done.done(), cuts
        reply = done.result()
        assert reply.status == 200
        assert reply.tail == body[-TAIL_BYTES:]
        assert json.loads(reply.tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]) == {"done": True, "eval_count": 50}
        assert connection.usable


async def test_the_answer_is_not_done_until_the_last_chunk_ends():
    response = HEAD + chunked(*LINES, FINAL)
    done, _ = _fed(response[:-2], [])  # all but the CRLF after the zero-size chunk
    assert not done.done()


async def test_the_tail_keeps_only_the_last_bytes_of_a_long_answer():
    lines = [b"x" * 1000 + b"\n" for _ in range(30)]
    done, _ = _fed(HEAD + chunked(*lines, FINAL), [])
    tail = done.result().tail
    assert len(tail) == TAIL_BYTES and tail.endswith(FINAL)


async def test_an_answer_with_a_content_length_and_connection_close():
    body = b'{"error":"model \\"nope\\" not found, try pulling it first"}'
    response = (b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body))
    done, connection = _fed(response, [20, len(response) - 3])
    reply = done.result()
    assert reply.status == 404 and reply.tail == body
    assert not connection.usable  # the server said it closes it


async def _serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_request(reader: asyncio.StreamReader) -> dict:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    return json.loads(await reader.readexactly(length))


async def test_answers_reuse_a_kept_alive_connection():
    connections = 0

    async def handler(reader, writer):
        nonlocal connections
        connections += 1
        while True:
            try:
                request = await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            writer.write(HEAD)
            for line in (b'{"n": %d}\n' % request["n"], FINAL):
                writer.write(chunked(line)[:-5])  # the chunk alone, in its own write
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        writer.close()

    server, port = await _serve(handler)
    client = StreamClient("127.0.0.1", port)
    try:
        for n in range(5):
            reply = await client.post("/api/generate", json.dumps({"n": n}).encode())
            assert reply.tail == b'{"n": %d}\n' % n + FINAL
            assert reply.reads >= 1 and reply.first_s <= reply.last_s
        assert connections == 1
    finally:
        client.close()
        server.close()


async def test_an_idle_connection_the_server_closed_is_replaced():
    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(HEAD + chunked(FINAL))
        await writer.drain()
        writer.close()  # no keep-alive, without saying so

    server, port = await _serve(handler)
    client = StreamClient("127.0.0.1", port)
    try:
        for _ in range(3):
            assert (await client.post("/", b"{}")).tail == FINAL
            await asyncio.sleep(0.05)  # the close reaches the client
    finally:
        client.close()
        server.close()


async def test_a_request_the_server_closed_on_unanswered_is_sent_again_on_a_new_connection():
    connections = 0

    async def handler(reader, writer):
        nonlocal connections
        connections += 1
        await _read_request(reader)
        writer.write(HEAD + chunked(FINAL))
        await writer.drain()
        await _read_request(reader)  # a second request on this connection: closed unanswered,
        writer.close()  # as a server does whose keep-alive ran out as the request came

    server, port = await _serve(handler)
    client = StreamClient("127.0.0.1", port)
    try:
        for _ in range(3):
            assert (await client.post("/", b"{}")).tail == FINAL
        assert connections == 3
    finally:
        client.close()
        server.close()


async def test_a_connection_lost_mid_answer_is_an_error():
    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(HEAD + chunked(LINES[0])[:-5])
        await writer.drain()
        writer.close()

    server, port = await _serve(handler)
    client = StreamClient("127.0.0.1", port)
    try:
        with pytest.raises(ConnectionError):
            await client.post("/", b"{}")
    finally:
        client.close()
        server.close()
