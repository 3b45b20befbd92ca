"""Redis connections for every vLLama process, and arq's JSON serializer.

Every connection the API, the workers and the heartbeat thread open goes through this module,
so ``VLLAMA_REDIS_URL`` means the same thing everywhere and is parsed in one place
(``parse_redis_url``). The forms, documented in README ("Redis: password, TLS, Sentinel"):

    redis://[[user]:password@]host[:port][/db]
    rediss://[[user]:password@]host[:port][/db]?ssl_ca_certs=/ca.pem[&ssl_certfile=..&ssl_keyfile=..]
    unix:///path/to/redis.sock[?db=N]
    redis+sentinel://[[user]:password@]host1[:26379],host2[:26379]/SERVICE[/db][?sentinel_password=..]
    rediss+sentinel://...   TLS to the sentinels and to the Redis servers alike

With Sentinel, each new connection asks the sentinels where the primary is, and a connection
that fails is dropped rather than reused, so after a failover every pool, the pub/sub
connection and the heartbeat thread reach the new primary on their next attempt. That only
holds while nothing keeps a connection made outside these pools.

arq pickles by default; a pickle read from a shared Redis runs code, so both the API's pool
and every worker use these JSON functions instead (redis-cli then shows readable jobs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from arq.connections import ArqRedis
from redis.exceptions import AuthenticationError, RedisError

from common.errors import ErrorCode, VllamaError

log = logging.getLogger(__name__)

SENTINEL_PORT = 26379
CONNECT_ATTEMPTS = 6  # 1 s apart: rides out a Redis restart or a failover in progress
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
SENTINEL_FORM = "redis+sentinel://[[user]:password@]host1:26379,host2:26379/SERVICE_NAME[/DB]"


# ------------------------------------------------------------------ arq's serializer


def _json_default(obj: Any) -> Any:
    # arq stores a failed job's exception as its result; keep the type and message readable.
    if isinstance(obj, BaseException):
        return {"error_type": type(obj).__name__, "error": str(obj)}
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def job_serializer(obj: Any) -> bytes:
    return json.dumps(obj, default=_json_default, separators=(",", ":")).encode()


def job_deserializer(data: bytes) -> Any:
    return json.loads(data)


# ------------------------------------------------------------------ errors


class RedisUrlError(VllamaError, ValueError):
    """VLLAMA_REDIS_URL cannot be used as written. A ValueError too, so that the settings
    reject it at start-up; ``problem`` is the message without the variable's name."""

    code = ErrorCode.UNAVAILABLE

    def __init__(self, problem: str) -> None:
        super().__init__(f"VLLAMA_REDIS_URL: {problem}")
        self.problem = problem


class RedisConnectError(VllamaError):
    """Redis could not be reached or refused us at start-up; the message says what to check."""

    code = ErrorCode.UNAVAILABLE


# ------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class RedisTarget:
    """What VLLAMA_REDIS_URL names. ``node`` holds the connection options of the Redis
    servers (address unless via Sentinel, db, credentials, TLS, timeouts)."""

    shown: str  # the URL with its passwords masked, for messages and logs
    node: dict[str, Any]
    tls: bool = False
    unix: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    sentinel_node: dict[str, Any] = field(default_factory=dict)  # options of the sentinel connections

    @property
    def via_sentinel(self) -> bool:
        return bool(self.sentinels)


def mask(url: str) -> str:
    """``url`` with its passwords replaced by ***: error messages and logs are shared."""
    url = re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)
    return re.sub(r"((?:^|[?&])sentinel_password=)[^&]*", r"\1***", url)


def _flag(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("use true or false")


def _cert_reqs(value: str) -> str:
    if value.lower() not in ("none", "optional", "required"):
        raise ValueError("use none, optional or required")
    return value.lower()


def _existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise ValueError("no such file")
    return value


def _seconds(value: str) -> float:
    seconds = float(value)
    if seconds <= 0:
        raise ValueError("use a number of seconds above 0")
    return seconds


def _db(value: str) -> int:
    if not value.isdigit():
        raise ValueError("use a database number such as 0")
    return int(value)


# Query parameters, by what they need: redis-py's own names, so its documentation applies.
_TLS_PARAMS = {"ssl_ca_certs": _existing_file, "ssl_certfile": _existing_file, "ssl_keyfile": _existing_file,
               "ssl_cert_reqs": _cert_reqs, "ssl_check_hostname": _flag}
_SENTINEL_PARAMS = {"sentinel_username": str, "sentinel_password": str}
_COMMON_PARAMS = {"db": _db, "socket_timeout": _seconds, "socket_connect_timeout": _seconds}


def _query(query: str, *, tls: bool, sentinel: bool) -> dict[str, Any]:
    known = {**_COMMON_PARAMS, **_TLS_PARAMS, **_SENTINEL_PARAMS}
    options: dict[str, Any] = {}
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name not in known:
            raise RedisUrlError(f"unknown parameter {name!r}; the URL takes {', '.join(sorted(known))}")
        if name in _TLS_PARAMS and not tls:
            raise RedisUrlError(f"{name} needs TLS: write rediss:// (or rediss+sentinel://)")
        if name in _SENTINEL_PARAMS and not sentinel:
            raise RedisUrlError(f"{name} applies to Sentinel only: {SENTINEL_FORM}?{name}=...")
        try:
            options[name] = known[name](unquote(values[-1]))
        except ValueError as exc:
            shown = "***" if "password" in name else values[-1]
            raise RedisUrlError(f"{name}={shown}: {exc}") from None
    return options


def _port(text: str, default: int) -> int:
    if not text:
        return default
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise RedisUrlError(f"port {text!r} is not a port number")
    return int(text)


def _address(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port``."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise RedisUrlError(f"cannot read the address {text!r}; write [ipv6]:port")
        port = rest[1:]
    else:
        host, _, port = text.partition(":")
    if not host:
        raise RedisUrlError(f"an address without a host in {text!r}")
    return unquote(host), _port(port, default_port)


def _credentials(userinfo: str) -> dict[str, str]:
    user, has_password, password = userinfo.partition(":")
    creds = {}
    if user:
        creds["username"] = unquote(user)
    if has_password:
        creds["password"] = unquote(password)
    return creds


def _path_db_into(node: dict[str, Any], segment: str, options: dict[str, Any]) -> None:
    if "db" in options:
        raise RedisUrlError("the database is given twice, in the path and as ?db=; keep one")
    try:
        node["db"] = _db(unquote(segment))
    except ValueError:
        raise RedisUrlError(f"the database in the path is {segment!r}; use a number such as /0") from None


def _keepalive() -> dict[str, Any]:
    """TCP options of every connection. A primary that vanishes without closing its sockets
    (a host lost, not a process killed) would otherwise leave reads waiting for many minutes;
    with these a dead peer is noticed within about 15 s, and its connection dropped."""
    wanted = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": 15_000}
    options = {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}
    return {"socket_keepalive": True, "socket_keepalive_options": options}


def parse_redis_url(url: str) -> RedisTarget:
    """The one reader of VLLAMA_REDIS_URL; raises RedisUrlError saying what to write instead."""
    url = url.strip()
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise RedisUrlError(f"{mask(url)!r} is not a Redis URL; it starts with "
                            f"{', '.join(s + '://' for s in SCHEMES)}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced [ in an IPv6 address
        raise RedisUrlError(f"cannot read {mask(url)!r}: {exc}") from None
    tls = scheme.startswith("rediss")
    sentinel = scheme.endswith("+sentinel")
    options = _query(parts.query, tls=tls, sentinel=sentinel)
    shown = mask(url)
    if sentinel:
        return _sentinel_target(parts.netloc, parts.path, options, tls, shown)
    return _direct_target(scheme, parts.netloc, parts.path, options, tls, shown)


def _direct_target(scheme: str, netloc: str, path: str, options: dict[str, Any], tls: bool,
                   shown: str) -> RedisTarget:
    userinfo, _, hostport = netloc.rpartition("@")
    node: dict[str, Any] = _credentials(userinfo)
    if scheme == "unix":
        if not path:
            raise RedisUrlError("a unix:// URL names the socket: unix:///path/to/redis.sock")
        node["path"] = unquote(path)
    else:
        node["host"], node["port"] = _address(hostport or "localhost", 6379)
        node.update(_keepalive())
        if path.strip("/"):
            _path_db_into(node, path.strip("/"), options)
    return RedisTarget(shown=shown, node=_node_options(node, options), tls=tls, unix=scheme == "unix")


def _node_options(node: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Defaults, then what the URL says; the sentinel credentials stay out."""
    merged = {"socket_connect_timeout": 2.0, **node}
    merged.update({k: v for k, v in options.items() if k not in _SENTINEL_PARAMS})
    merged.setdefault("db", 0)
    return merged


def _sentinel_target(netloc: str, path: str, options: dict[str, Any], tls: bool, shown: str) -> RedisTarget:
    userinfo, _, hosts = netloc.rpartition("@")
    if not hosts:
        raise RedisUrlError(f"no sentinel named; write {SENTINEL_FORM}")
    sentinels = tuple(_address(h.strip(), SENTINEL_PORT) for h in hosts.split(","))
    segments = [s for s in path.split("/") if s]
    if not segments or len(segments) > 2:
        raise RedisUrlError(f"a Sentinel URL names the service (the name in `sentinel monitor`) "
                            f"after the sentinels: {SENTINEL_FORM}")
    node: dict[str, Any] = {**_credentials(userinfo), **_keepalive()}
    if len(segments) == 2:
        _path_db_into(node, segments[1], options)
    node = _node_options(node, options)
    sentinel_node = {k: v for k, v in node.items() if k.startswith(("socket_", "ssl_"))}
    if tls:
        sentinel_node["ssl"] = True
    if "sentinel_username" in options:
        sentinel_node["username"] = options["sentinel_username"]
    if "sentinel_password" in options:
        sentinel_node["password"] = options["sentinel_password"]
    return RedisTarget(shown=shown, node=node, tls=tls, sentinels=sentinels, service=unquote(segments[0]),
                       sentinel_node=sentinel_node)


# ------------------------------------------------------------------ clients


class _SentinelArqRedis(ArqRedis):
    """Closes the connections to the sentinels with its own."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in self.connection_pool.sentinel_manager.sentinels:
            await sentinel.aclose()


class _SentinelRedis(redis.Redis):
    """Closes the connections to the sentinels with its own."""

    def close(self) -> None:
        super().close()
        for sentinel in self.connection_pool.sentinel_manager.sentinels:
            sentinel.close()


def _async_client(target: RedisTarget) -> ArqRedis:
    if target.via_sentinel:
        sentinels = redis.asyncio.sentinel.Sentinel(list(target.sentinels), sentinel_kwargs=target.sentinel_node)
        pool: redis.asyncio.ConnectionPool = redis.asyncio.sentinel.SentinelConnectionPool(
            target.service, sentinels, ssl=target.tls, **target.node)
        client: ArqRedis = _SentinelArqRedis.from_pool(pool)
    else:
        kinds = redis.asyncio.connection
        connection_class = (kinds.UnixDomainSocketConnection if target.unix
                            else kinds.SSLConnection if target.tls else kinds.Connection)
        client = ArqRedis.from_pool(redis.asyncio.ConnectionPool(connection_class=connection_class, **target.node))
    client.job_serializer = job_serializer
    client.job_deserializer = job_deserializer
    return client


def sync_client(url: str, **overrides: Any) -> redis.Redis:
    """A blocking client (the heartbeat thread's), failing over like the async pools.
    ``overrides``: connection options that win over the URL's, e.g. ``socket_timeout``."""
    target = parse_redis_url(url)
    node = {**target.node, **overrides}
    if target.via_sentinel:
        sentinels = redis.sentinel.Sentinel(
            list(target.sentinels), sentinel_kwargs={**target.sentinel_node, **overrides})
        return _SentinelRedis.from_pool(
            redis.sentinel.SentinelConnectionPool(target.service, sentinels, ssl=target.tls, **node))
    kinds = redis.connection
    connection_class = (kinds.UnixDomainSocketConnection if target.unix
                        else kinds.SSLConnection if target.tls else kinds.Connection)
    return redis.Redis.from_pool(redis.ConnectionPool(connection_class=connection_class, **node))


def _refused(target: RedisTarget, exc: Exception) -> str:
    where = f"the Redis of service {target.service!r}" if target.via_sentinel else "Redis"
    return (f"VLLAMA_REDIS_URL: {where} at {target.shown} refused the credentials ({exc}); "
            "put the right password in the URL (redis://:PASSWORD@host:port/db, or USER:PASSWORD@ "
            "with an ACL user)")


def _unreachable(target: RedisTarget, exc: Exception) -> str:
    if target.via_sentinel:
        hint = (f"check that the sentinels run, that they monitor a service named {target.service!r}, "
                "and sentinel_password if they require one")
    elif target.tls:
        hint = ("check that Redis is up with TLS on that port, that ssl_ca_certs names the CA that signed its "
                "certificate, and, if it asks clients for certificates, ssl_certfile and ssl_keyfile")
    else:
        hint = "check that Redis is up and the URL points to it (rediss:// for a TLS port)"
    return f"VLLAMA_REDIS_URL: cannot reach Redis at {target.shown} ({exc}); {hint}"


async def connect(url: str, *, attempts: int = CONNECT_ATTEMPTS) -> ArqRedis:
    """An ArqRedis (a redis.asyncio.Redis) with the JSON serializer, once Redis answers.

    Redis away at start-up is retried for a few seconds (a restart, a failover under way);
    refused credentials are not, as waiting cannot fix them. Both end in RedisConnectError,
    whose message names VLLAMA_REDIS_URL and what to check."""
    target = parse_redis_url(url)
    client = _async_client(target)
    for attempt in range(1, attempts + 1):
        try:
            await client.ping()
            return client
        except AuthenticationError as exc:
            await client.aclose()
            raise RedisConnectError(_refused(target, exc)) from None
        except (RedisError, OSError) as exc:
            if attempt == attempts:
                await client.aclose()
                raise RedisConnectError(_unreachable(target, exc)) from None
            log.warning("Redis at %s does not answer (%s); trying again in 1 s", target.shown, exc)
            await asyncio.sleep(1)
    raise AssertionError("unreachable")


def exit_unless_reachable(url: str) -> None:
    """For command entry points: one line naming what to fix instead of a traceback when
    Redis refuses us or cannot be reached at start-up."""

    async def check() -> None:
        client = await connect(url)
        await client.aclose()

    try:
        asyncio.run(check())
    except VllamaError as exc:
        raise SystemExit(exc.message) from None
