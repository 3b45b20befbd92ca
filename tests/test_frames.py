"""The worker's frame sink (workers/frames.py): many jobs' frames and writes share one round
trip, so what one job does while waiting for it must not touch the others."""

from __future__ import annotations

import asyncio

from common.redis_conn import connect
from workers.frames import FrameSink


async def test_a_job_cancelled_while_its_batch_travels_leaves_the_batch_to_the_others(redis_server):
    redis = await connect(redis_server.url)
    sink = FrameSink(redis)
    sink.start()
    try:
        async def waits(future):
            return await future

        # Two jobs' writes in one batch: a job's end, and another's frame on its reply channel.
        cancelled = asyncio.create_task(waits(sink.write(lambda pipe: pipe.set("test:ended", "1"))))
        other = asyncio.create_task(waits(sink.reply("vllama:replies:test", "job-2", b'{"seq":0}')))
        await asyncio.sleep(0)  # both wait for the batch, which is on its way
        cancelled.cancel()  # its client left, say
        assert await asyncio.wait_for(other, 10) == {"vllama:replies:test": 0}
        assert await redis.get("test:ended") == b"1"  # the batch went whole
        # And the sink goes on sending.
        assert await asyncio.wait_for(sink.write(lambda pipe: pipe.set("test:later", "1")), 10) == {}
        assert await redis.get("test:later") == b"1"
    finally:
        await sink.stop()
        await redis.aclose()
