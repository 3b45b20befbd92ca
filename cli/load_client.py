"""The benchmark's client for streamed answers: HTTP/1.1 POSTs over kept-alive connections,
doing for each answer only what `vllama bench` needs.

On a small machine the load generator shares the cores with what it measures. With aiohttp
it took about a fifth of the CPU at 256 streams (22 ms per 1,000 tokens, against the API's 43
and the worker's 33), all of it taken from the server and counted against it. This client keeps,
per answer, the time of its first and last body bytes, how many reads carried them, and the
body's last bytes (where the final line and the usage are); it undoes chunked transfer coding
and nothing else.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

TAIL_BYTES = 8192  # of the body, kept for the final line (or the last SSE events)
TIMEOUT_S = 600.0  # for a whole answer


@dataclass
class Reply:
    status: int
    first_s: float | None = None  # time.perf_counter() when the first body bytes came
    last_s: float | None = None  # ... and the last
    reads: int = 0  # reads that carried body bytes
    tail: bytes = b""  # the body's last TAIL_BYTES, de-chunked


# Where a chunked body's parser is between reads.
_SIZE = -1  # at a chunk's size line
_DATA_END = -2  # at the CRLF after a chunk's data
_LAST = -3  # at the CRLF after the zero-size chunk (no trailers are sent)


class _Connection(asyncio.Protocol):
    """One kept-alive connection, one answer at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.usable = True
        self._done: asyncio.Future[Reply] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        self._fail(exc or ConnectionError("the server closed the connection mid-answer"))

    def post(self, request: bytes) -> asyncio.Future[Reply]:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._timer = loop.call_later(TIMEOUT_S, self._fail, TimeoutError(f"no whole answer in {TIMEOUT_S:.0f} s"))
        self._reply: Reply | None = None
        self._buf = b""
        self._length: int | None = None  # Content-Length, when the body is not chunked
        self._left = _SIZE  # chunked: bytes of the current chunk's data still to come, or a state
        self.transport.write(request)
        return self._done

    @property
    def answered(self) -> bool:
        """Whether the answer to the last request had begun."""
        return self._reply is not None

    def data_received(self, data: bytes) -> None:
        if self._done is None or self._done.done():
            self.usable = False  # bytes nobody asked for: this connection is out of step
            return
        if self._reply is None:
            data = self._head(data)
            if self._reply is None or not data:
                return
        reply = self._reply
        reply.last_s = time.perf_counter()
        if reply.first_s is None:
            reply.first_s = reply.last_s
        reply.reads += 1
        if self._length is not None:
            self._take(data)
            self._length -= len(data)
            if self._length <= 0:
                self._finish()
        else:
            self._chunked(data)

    def _head(self, data: bytes) -> bytes:
        """Reads the status line and headers; returns the body bytes that came with them."""
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return b""
        head, body = self._buf[:end].decode("latin-1"), self._buf[end + 4:]
        self._buf = b""
        lines = head.split("\r\n")
        self._reply = Reply(status=int(lines[0].split(" ", 2)[1]))
        headers = dict(line.lower().split(":", 1) for line in lines[1:] if ":" in line)
        if headers.get("connection", "").strip() == "close":
            self.usable = False
        if "transfer-encoding" not in headers:
            self._length = int(headers.get("content-length", "0"))
            if self._length == 0:
                self._finish()
        return body

    def _chunked(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos, size = 0, len(buf)
        while pos < size:
            if self._left > 0:
                end = min(size, pos + self._left)
                self._take(buf[pos:end])
                self._left -= end - pos
                pos = end
                if self._left == 0:
                    self._left = _DATA_END
            elif self._left in (_DATA_END, _LAST):
                if size - pos < 2:
                    break
                pos += 2
                if self._left == _LAST:
                    self._finish()
                    return
                self._left = _SIZE
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                chunk = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                self._left = chunk if chunk else _LAST
        self._buf = buf[pos:]

    def _take(self, body: bytes) -> None:
        tail = self._reply.tail + body
        self._reply.tail = tail[-TAIL_BYTES:] if len(tail) > TAIL_BYTES else tail

    def _finish(self) -> None:
        self._timer.cancel()
        if not self._done.done():
            self._done.set_result(self._reply)

    def _fail(self, exc: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._done is not None and not self._done.done():
            self.usable = False
            self._done.set_exception(exc)
            self.transport.close()


class StreamClient:
    """Streamed POSTs to one server, each on an idle kept-alive connection or a new one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[_Connection] = []

    async def post(self, path: str, body: bytes) -> Reply:
        """POSTs ``body`` (JSON) to ``path`` and reads the whole answer."""
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        while self._idle:
            connection = self._idle.pop()
            if not connection.usable:
                continue
            try:
                return self._kept(connection, await connection.post(request))
            except ConnectionError:
                if connection.answered:
                    raise
                # The server closed the idle connection as the request went out: a new one.
        _, connection = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
        return self._kept(connection, await connection.post(request))

    def _kept(self, connection: _Connection, reply: Reply) -> Reply:
        if connection.usable:
            self._idle.append(connection)
        return reply

    def close(self) -> None:
        for connection in self._idle:
            connection.transport.close()
        self._idle.clear()
