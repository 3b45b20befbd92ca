"""The private Redis of `vllama serve`: its append-only file brings the data back after a
crash; without one (the tests' own Redis) nothing is written; one data directory, one Redis."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from cli.embedded_redis import EmbeddedRedis
from cli.parts import load_settings
from common.settings import Settings


@pytest.fixture
def servers():
    started: list[EmbeddedRedis] = []
    yield started
    for server in started:
        if server.pid is not None and server.alive():
            os.kill(server.pid, signal.SIGKILL)
        server.stop()


def _start(servers: list[EmbeddedRedis], **kw) -> EmbeddedRedis:
    server = EmbeddedRedis(**kw)
    servers.append(server)
    return server.start()


def test_writes_survive_redis_being_killed(tmp_path, servers):
    first = _start(servers, data_dir=tmp_path / "redis", appendfsync="everysec")
    client = redis.Redis.from_url(first.url)
    client.set("plain", "kept")
    client.set("with-ttl", "kept too", ex=3600)
    client.set("short-lived", "gone by then", px=1000)
    client.hset("hash", mapping={"a": "1", "b": "2"})
    client.zadd("zset", {"x": 1.5})
    client.close()
    time.sleep(1.5)  # everysec: flushed to disk by now
    os.kill(first.pid, signal.SIGKILL)
    assert first._proc.wait(10) == -signal.SIGKILL

    second = _start(servers, data_dir=tmp_path / "redis", appendfsync="everysec")
    client = redis.Redis.from_url(second.url)
    try:
        assert client.get("plain") == b"kept"
        assert client.get("with-ttl") == b"kept too"
        assert 3500 < client.ttl("with-ttl") <= 3600  # the expiry time is kept, not reset
        assert client.get("short-lived") is None  # expired while Redis was down
        assert client.hgetall("hash") == {b"a": b"1", b"b": b"2"}
        assert client.zscore("zset", "x") == 1.5
    finally:
        client.close()


def test_one_data_directory_takes_one_redis(tmp_path, servers):
    running = _start(servers, data_dir=tmp_path / "redis", appendfsync="everysec")
    with pytest.raises(RuntimeError, match=f"pid {running.pid}.*VLLAMA_HOME"):
        _start(servers, data_dir=tmp_path / "redis", appendfsync="everysec")
    assert running.alive()
    running.stop()
    _start(servers, data_dir=tmp_path / "redis", appendfsync="always")  # free once it has stopped


def test_without_an_fsync_policy_nothing_is_written(tmp_path, servers):
    first = _start(servers, data_dir=tmp_path / "redis")
    client = redis.Redis.from_url(first.url)
    client.set("k", "v")
    client.close()
    first.stop()
    written = {p.name for p in (tmp_path / "redis").iterdir()} - {"redis-server.log"}
    assert written == set(), f"a test Redis wrote {written}"
    second = _start(servers, data_dir=tmp_path / "redis")
    client = redis.Redis.from_url(second.url)
    assert client.get("k") is None
    client.close()


def test_the_fsync_policy_is_a_checked_setting(monkeypatch):
    monkeypatch.delenv("VLLAMA_REDIS_APPENDFSYNC", raising=False)
    assert Settings().redis_appendfsync == "everysec"
    monkeypatch.setenv("VLLAMA_REDIS_APPENDFSYNC", "always")
    assert Settings().redis_appendfsync == "always"
    monkeypatch.setenv("VLLAMA_REDIS_APPENDFSYNC", "sometimes")
    with pytest.raises(SystemExit, match="VLLAMA_REDIS_APPENDFSYNC: .*'everysec'"):
        load_settings()
