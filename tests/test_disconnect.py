"""CancelledOnDisconnect and StreamedAnswer (api/disconnect.py): a client leaving cancels the
work done for it, and nothing else."""

from __future__ import annotations

import asyncio

import pytest

from api.disconnect import CancelledOnDisconnect, ClientDisconnected, StreamedAnswer


class Client:
    """An ASGI receive whose client leaves when told to."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_a_client_leaving_cancels_the_work_and_raises_client_disconnected():
    client = Client()
    cleaned = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.set()

    asyncio.get_running_loop().call_later(0.05, client.gone.set)
    with pytest.raises(ClientDisconnected):
        async with CancelledOnDisconnect(client.receive):
            await work()
    assert cleaned.is_set()
    # The cancellation was taken back: this task's timeouts still work as timeouts.
    assert asyncio.current_task().cancelling() == 0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)


async def test_work_that_ends_first_returns_and_leaves_no_watcher_behind():
    client = Client()
    before = len(asyncio.all_tasks())
    async with CancelledOnDisconnect(client.receive) as watch:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)  # the watcher's cancellation runs
    assert not watch.left
    assert len(asyncio.all_tasks()) == before
    client.gone.set()
    await asyncio.sleep(0.01)
    assert asyncio.current_task().cancelling() == 0  # a client leaving later touches nothing


async def test_a_cancellation_from_elsewhere_stays_a_cancellation():
    client = Client()

    async def request() -> None:
        async with CancelledOnDisconnect(client.receive):
            await asyncio.sleep(60)

    task = asyncio.create_task(request())
    await asyncio.sleep(0.01)
    task.cancel()  # the server shutting down, say
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_streamed_answer_stops_and_closes_its_body_when_the_client_leaves():
    client = Client()
    sent: list[dict] = []
    closed = asyncio.Event()

    async def body():
        try:
            for i in range(1000):
                yield b"line %d\n" % i
                await asyncio.sleep(0.005)
        finally:
            closed.set()

    async def send(message: dict) -> None:
        sent.append(message)
        if len(sent) == 5:
            client.gone.set()

    await StreamedAnswer(body(), media_type="application/x-ndjson")({"type": "http"}, client.receive, send)
    assert closed.is_set()
    assert 5 <= len(sent) < 20  # stopped soon after the client left, with no error raised
    assert sent[0]["type"] == "http.response.start"


async def test_a_streamed_answer_is_sent_whole_while_the_client_stays():
    client = Client()
    sent: list[dict] = []

    async def body():
        for i in range(3):
            yield b"line %d\n" % i

    async def send(message: dict) -> None:
        sent.append(message)

    await StreamedAnswer(body(), media_type="application/x-ndjson")({"type": "http"}, client.receive, send)
    assert [m.get("body") for m in sent[1:]] == [b"line 0\n", b"line 1\n", b"line 2\n", b""]
    assert sent[-1]["more_body"] is False
