"""Commands of concurrent callers in one round trip (common/pipelined.py): the enqueues of
the requests an API process handles at the same moment."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from common.pipelined import Pipelined
from common.redis_conn import connect


async def test_concurrent_callers_share_a_round_trip_and_each_gets_its_own_reply(redis_server):
    redis = await connect(redis_server.url)
    try:
        round_trips = 0
        pipeline = redis.pipeline

        def counting(*args, **kwargs):
            nonlocal round_trips
            round_trips += 1
            return pipeline(*args, **kwargs)

        redis.pipeline = counting
        batched = Pipelined(redis)
        script = "return tonumber(ARGV[1]) * 2"
        replies = await asyncio.gather(*(batched.eval(script, 0, i) for i in range(50)))
        assert replies == [2 * i for i in range(50)]
        assert round_trips == 1
        assert await batched.eval(script, 0, 21) == 42  # alone, it goes at once
        assert round_trips == 2
    finally:
        await redis.aclose()


async def test_a_failing_command_fails_only_its_caller(redis_server):
    redis = await connect(redis_server.url)
    try:
        batched = Pipelined(redis)
        ok = "return 1"
        outcomes = await asyncio.gather(batched.eval(ok, 0), batched.eval("return redis.error_reply('no room')", 0),
                                        batched.eval(ok, 0), return_exceptions=True)
        assert outcomes[0] == 1 and outcomes[2] == 1
        assert isinstance(outcomes[1], ResponseError) and "no room" in str(outcomes[1])
    finally:
        await redis.aclose()


async def test_a_connection_failure_reaches_every_caller_of_the_batch():
    unreachable = Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)  # nothing listens on port 1
    batched = Pipelined(unreachable)
    outcomes = await asyncio.gather(*(batched.eval("return 1", 0) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(o, RedisConnectionError) for o in outcomes)
    with pytest.raises(RedisConnectionError):
        await batched.eval("return 1", 0)  # and the next caller is not left waiting
    await unreachable.aclose()
