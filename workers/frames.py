"""Publishing frames: numbered per job, batched per worker, bundled per API process.

Every job of a worker publishes through one ``FrameSink``, which sends whatever frames (and
other writes: a job's record as it starts and ends, arq's end of it) have gathered as one
pipeline while the previous one is in flight. A GPU worker may stream
hundreds of requests, tens of thousands of tokens a second, and vLLM hands over one engine
step's tokens for all of them at once; the sink turns that step into one message per API
process rather than one per token:

- A streamed job names its API process's reply channel (``reply_to``). Its frames go into a
  *bundle*, one JSON object per reply channel and pipeline, ``{"<job id>": [frame, ...], ...}``,
  which that API process splits among the streams it serves.
- An async job has no reply channel: its frames go one message each to its own channel
  (``vllama:frames:<id>``), for any followers, and are appended to a list
  (``vllama:job-frames:<id>``) in the same pipeline, for the jobs API to read later.

Frames of one job keep their order: there is a single sender and batches are FIFO. Token
frames are not waited for (a job goes on with its next output while they travel); whether
anyone still listens is known from the latest publish (``listening``). Final frames are
awaited.

A batch that Redis does not take (a restart, a failover) is sent again until it does, for up
to FINAL_WRITE_PATIENCE_S, so a job outlives a short outage with its frames whole and in
order. A batch that reached Redis before the connection broke may arrive twice; readers skip
a frame whose sequence number they have already seen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import orjson
from redis.asyncio import Redis

from common import keys
from common.protocol import TokenFrame, TokenLogprob
from common.tasks import cancel_and_wait, until_redis_answers

log = logging.getLogger(__name__)

Listeners = dict[str, int]  # reply channel -> subscribers that received the batch's bundle
Write = Callable[[Any], None]  # adds commands to a pipeline


class FrameSink:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._writes: list[Write] = []  # in order: frames of their own channel, other writes
        self._bundles: dict[str, dict[str, list[bytes]]] = {}  # reply channel -> job id -> frames
        self._batch: asyncio.Future[Listeners] | None = None  # resolves when the gathered batch is sent
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._listeners: Listeners = {}  # at the latest publish to each channel
        self._last: asyncio.Future[Listeners] | None = None  # the latest batch, sent or not

    def start(self) -> None:
        self._task = asyncio.create_task(self._send_loop(), name="frame-sink")

    async def stop(self, grace_s: float = 5.0) -> None:
        """Send what is gathered (the ends of the last jobs), then stop."""
        last = self._last
        if last is not None and self._task is not None:
            with suppress(Exception, asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(last), grace_s)
        await cancel_and_wait(self._task)
        self._task = None

    # Each of these returns its own future for the batch (to await, or to ignore): the batch's
    # one future is shared by all its jobs, and a job cancelled while awaiting it directly
    # would cancel it for all of them.

    def publish(self, channel: str, data: bytes, keep: FrameLog | None = None) -> asyncio.Future[Listeners]:
        """Publish one frame as a message of its own (and append it to ``keep``'s list)."""
        def write(pipe: Any) -> None:
            pipe.publish(channel, data)
            if keep is not None:
                keep.append(pipe, data)

        return self.write(write)

    def write(self, write: Write) -> asyncio.Future[Listeners]:
        """Other commands for the next batch, in order with the frames of their own channel and
        ahead of the bundles (a started job's record, then its start frame). A batch Redis did
        not take is sent again, so they must be safe to repeat."""
        self._writes.append(write)
        return _own(self._gathering())

    def reply(self, channel: str, job_id: str, data: bytes) -> asyncio.Future[Listeners]:
        """Publish one frame of ``job_id`` in the next bundle for ``channel``."""
        return _own(self.reply_unawaited(channel, job_id, data))

    def reply_unawaited(self, channel: str, job_id: str, data: bytes) -> asyncio.Future[Listeners]:
        """``reply`` for a frame nobody waits for (a token: the hot path), without a future of
        its own. The batch's shared future it returns must not be awaited."""
        self._bundles.setdefault(channel, {}).setdefault(job_id, []).append(data)
        return self._gathering()

    def listening(self, channel: str) -> bool:
        """Whether the latest bundle to reply channel ``channel`` reached its API process
        (True before any). There are a few reply channels, one per API process; a job's own
        channel is not tracked (an async job runs whether or not anyone follows it)."""
        return self._listeners.get(channel, 1) > 0

    def _gathering(self) -> asyncio.Future[Listeners]:
        if self._batch is None:
            self._batch = self._last = asyncio.get_running_loop().create_future()
            self._batch.add_done_callback(_retrieved)
            self._ready.set()
        return self._batch

    async def _send(self, writes: list[Write], bundles: dict[str, dict[str, list[bytes]]]) -> Listeners:
        async with self._redis.pipeline(transaction=False) as pipe:
            for write in writes:
                write(pipe)
            for channel, jobs in bundles.items():
                pipe.publish(channel, bundle(jobs))
            replies = await pipe.execute()
        return dict(zip(bundles, replies[len(replies) - len(bundles):]))

    async def _send_loop(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            writes, bundles, done = self._writes, self._bundles, self._batch
            self._writes, self._bundles, self._batch = [], {}, None
            if done is None:
                continue
            try:
                listeners = await until_redis_answers(lambda: self._send(writes, bundles), "publishing frames")
            except asyncio.CancelledError:
                done.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - each waiting job gets the error
                done.set_exception(exc)
                continue
            self._listeners.update(listeners)
            done.set_result(listeners)


def _retrieved(future: asyncio.Future) -> None:
    """Token frames are not awaited: a batch's failure must not be reported as never retrieved."""
    if not future.cancelled():
        future.exception()


def _own(batch: asyncio.Future[Listeners]) -> asyncio.Future[Listeners]:
    """A future of the caller's own for the batch's shared one."""
    own = asyncio.shield(batch)
    own.add_done_callback(_retrieved)
    return own


def bundle(jobs: dict[str, list[bytes]]) -> bytes:
    """``{"<job id>": [frame, ...], ...}`` from frames already in JSON."""
    return b"{" + b",".join(orjson.dumps(job_id) + b":[" + b",".join(frames) + b"]"
                            for job_id, frames in jobs.items()) + b"}"


class FrameLog:
    """Where an async job's frames are kept, and for how long after the latest."""

    REPLIES = 2  # commands append() adds to a pipeline

    def __init__(self, job_id: str, ttl_s: int) -> None:
        self.key = keys.job_frames(job_id)
        self.ttl_s = ttl_s

    def append(self, pipe: Any, data: bytes) -> None:
        pipe.rpush(self.key, data)
        pipe.expire(self.key, self.ttl_s)


class FramePublisher:
    """One job's frames, with consecutive sequence numbers: bundled on its API process's
    reply channel (a streamed job), or on its own channel and kept in ``keep`` (an async job)."""

    def __init__(self, sink: FrameSink, job_id: str, reply_to: str | None = None,
                 keep: FrameLog | None = None) -> None:
        self._sink = sink
        self.job_id = job_id
        self.reply_to = reply_to
        self.channel = reply_to or keys.frames_channel(job_id)
        self.keep = keep
        self._seq = 0

    def next(self, frame_type: type, **fields: Any) -> bytes:
        """The next frame, numbered, as JSON (for callers that publish it themselves)."""
        frame = frame_type(seq=self._seq, **fields)
        self._seq += 1
        return frame.model_dump_json().encode()

    def message(self, data: bytes) -> bytes:
        """``data`` (a frame) as the message its channel carries."""
        return data if self.reply_to is None else bundle({self.job_id: [data]})

    def send(self, frame_type: type, **fields: Any) -> asyncio.Future[Listeners]:
        """Publish a frame; await the result to know it was sent."""
        return self._publish(self.next(frame_type, **fields))

    def token(self, text: str, logprobs: list[TokenLogprob] | None = None) -> None:
        """Publish a piece of the answer: the hot path, one per engine output of each job."""
        if logprobs:
            self.send(TokenFrame, text=text, logprobs=logprobs)
            return
        self._piece("token", text)

    def thinking(self, text: str) -> None:
        """Publish a piece of the model's reasoning (a ThinkingFrame), as ``token`` does."""
        self._piece("thinking", text)

    def _piece(self, frame_type: str, text: str) -> None:
        data = orjson.dumps({"seq": self._seq, "type": frame_type, "text": text})
        self._seq += 1
        if self.reply_to is None:
            self._sink.publish(self.channel, data, self.keep)
        else:
            self._sink.reply_unawaited(self.channel, self.job_id, data)

    def listening(self) -> bool:
        """Whether someone still reads this job's channel, as of the latest publish."""
        return self._sink.listening(self.channel)

    def _publish(self, data: bytes) -> asyncio.Future[Listeners]:
        if self.reply_to is None:
            return self._sink.publish(self.channel, data, self.keep)
        return self._sink.reply(self.channel, self.job_id, data)

