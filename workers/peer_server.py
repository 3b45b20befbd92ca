"""A store's files, served to other machines: how a model made on one host reaches the others.

Every pull worker runs this small HTTP server in its own event loop (uvicorn; files are read
by Starlette in threads, so a large download never blocks the loop). Another machine's pull
worker or generation worker fetches a model with one request per file (workers/peer_fetch.py):

    GET /v1/file?model=<canonical name>&path=<path in the manifest>
    Authorization: Bearer <token>

It also takes and gives blobs, the files of Ollama's /api/blobs (workers/blobs.py): the API
streams an upload to ``PUT /v1/blob/<sha256 hex>``, and a store making a model from blobs it
lacks fetches them with ``GET /v1/blob/<sha256 hex>``; same token. A blob is served only under
the digest its bytes were checked against, so its name is all a reader needs to trust it.

What must stay true:
- Only the bytes of files listed in a manifest of this store are served, read from this
  store's disk at request time: a path not listed, a model not here, or anything whose real
  path leaves the store's directory is 404, whatever the path looks like.
- Every request carries the token this process made at start and published only in its store
  record in Redis (``StoreInfo.token``): only processes that can read our Redis may fetch.
  A restarted pull worker has a new token; fetchers read it from Redis again.
- Nothing here is trusted by the fetcher: it checks each file's size and sha256 against the
  manifest itself.

The URL advertised in Redis is, unless ``VLLAMA_STORE_ADVERTISE`` says otherwise, the local
address of this process's connection to Redis: by construction reachable from the network
Redis is on, which is where every other store and worker is. The server listens on that
address only (``VLLAMA_STORE_BIND`` widens it), so a single-machine install with a private
Redis on 127.0.0.1 opens nothing to the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import logging
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from common.blob_catalog import BLOB_ROUTE
from common.model_paths import path_problem
from common.models import canonical_name
from common.settings import Settings
from common.tasks import until_redis_answers
from workers.blobs import SHA256, BlobReceiver, serve
from workers.store import ModelStore

log = logging.getLogger(__name__)

FILE_ROUTE = "/v1/file"
START_TIMEOUT_S = 30.0
GRACEFUL_STOP_S = 2.0  # a fetch cut short is retried from another store, or fails clearly


class StoreServerError(Exception):
    """The server cannot start as configured; the message names the setting to change."""


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the pull worker owns SIGINT and SIGTERM, and
    stops this server itself when it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class StoreServer:
    """Serves one store's listed files to holders of ``token``."""

    def __init__(self, store: ModelStore, token: str | None = None) -> None:
        self.store = store
        self.token = token or secrets.token_urlsafe(32)
        self.url: str | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None
        self.blob_receiver: BlobReceiver | None = None  # set by the pull worker: uploads need Redis

    # ------------------------------------------------------------ life

    async def start(self, settings: Settings, redis: Redis) -> str:
        """Bind, serve, and return the URL to advertise; StoreServerError if it cannot."""
        detected = None
        if not settings.store_advertise:
            detected = await until_redis_answers(lambda: local_address(redis), "finding this machine's address")
        bind = settings.store_bind or detected or "0.0.0.0"
        sock = _bind(bind, settings.store_port, explicit="store_port" in settings.model_fields_set)
        port = sock.getsockname()[1]
        self.url = _advertised_url(settings.store_advertise or detected or socket.gethostname(), port)
        config = uvicorn.Config(self._app(), lifespan="off", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=GRACEFUL_STOP_S)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="store-file-server")
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise StoreServerError("the store's file server stopped as it started")
            if asyncio.get_running_loop().time() > deadline:
                await self.stop()
                raise StoreServerError(f"the store's file server did not start within {START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.01)
        log.info("store files served at %s (listening on %s:%d)", self.url, bind, port)
        return self.url

    async def stop(self) -> None:
        """Idempotent; downloads still running get GRACEFUL_STOP_S to end, then are cut."""
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task
        self._server = self._task = None

    # ------------------------------------------------------------ requests

    def _app(self) -> Starlette:
        return Starlette(routes=[Route(FILE_ROUTE, self._file, methods=["GET"]),
                                 Route(BLOB_ROUTE, self._blob, methods=["GET", "PUT"])])

    async def _blob(self, request: Request) -> Response:
        if not self._authorized(request.headers.get("authorization", "")):
            return PlainTextResponse("a store token is needed: read it from this store's record in Redis\n",
                                     status_code=401, headers={"WWW-Authenticate": "Bearer"})
        sha = request.path_params["sha"]
        if not SHA256.fullmatch(sha):
            return PlainTextResponse("a blob is named by its sha256, 64 lowercase hex digits\n", status_code=404)
        if request.method == "GET":
            return await asyncio.to_thread(serve, self.store, sha)
        if self.blob_receiver is None:
            return PlainTextResponse("this store takes no uploads yet; try again in a moment\n", status_code=503)
        return await self.blob_receiver.receive(request, sha)

    async def _file(self, request: Request) -> Response:
        if not self._authorized(request.headers.get("authorization", "")):
            return PlainTextResponse("a store token is needed: read it from this store's record in Redis\n",
                                     status_code=401, headers={"WWW-Authenticate": "Bearer"})
        model = request.query_params.get("model", "")
        path = request.query_params.get("path", "")
        found = await asyncio.to_thread(self.listed_file, model, path)
        if found is None:
            return PlainTextResponse(f"{path!r} is not a file of model {model!r} in this store\n", status_code=404)
        return FileResponse(found)

    def _authorized(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def listed_file(self, model: str, path: str) -> Path | None:
        """The file ``path`` of ``model`` if this store's manifest of it lists it and it is a
        regular file inside the store (the Hub cache's symlinks point into the store's own
        ``blobs/``); None for anything else, however it is spelled."""
        if path_problem(path) is not None:  # whatever a manifest says, never a path that climbs
            return None
        try:
            manifest = self.store.get(canonical_name(model))
            if manifest is None or path not in {f.path for f in manifest.files}:
                return None
            candidate = (self.store.model_dir(manifest) / path).resolve()
        except Exception:  # noqa: BLE001 - an invalid name, an unreadable manifest: not served
            return None
        if not candidate.is_relative_to(self.store.root.resolve()) or not candidate.is_file():
            return None
        return candidate


# ---------------------------------------------------------------- addresses


async def local_address(redis: Redis) -> str | None:
    """This end's address of a connection to Redis (through Sentinel: to the primary).
    Over a unix socket Redis, and so every store using it, is on this machine: 127.0.0.1."""
    pool = redis.connection_pool
    connection = await pool.get_connection("PING")
    try:
        writer = getattr(connection, "_writer", None)
        sockname = writer.get_extra_info("sockname") if writer is not None else None
    finally:
        await pool.release(connection)
    if isinstance(sockname, tuple) and sockname and sockname[0]:
        return str(sockname[0]).split("%", 1)[0]  # an IPv6 scope is meaningless to other hosts
    return "127.0.0.1" if sockname is not None else None


def _advertised_url(address: str, port: int) -> str:
    """``host`` or ``host:port`` (``[v6]:port``) as given by the operator, else ``host`` and
    the bound port."""
    address = address.strip().removeprefix("http://").rstrip("/")
    if address.startswith("[") and "]:" in address:
        return f"http://{address}"
    if address.count(":") == 1:
        return f"http://{address}"
    if ":" in address:  # a bare IPv6 address
        address = f"[{address.strip('[]')}]"
    return f"http://{address}:{port}"


def _bind(host: str, port: int, *, explicit: bool) -> socket.socket:
    """A listening socket. The default port, when taken (another store on this machine), gives
    way to a free one, since peers read the URL from Redis; a port chosen with
    VLLAMA_STORE_PORT that is taken is an error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and port and not explicit:
            log.warning("port %d is taken; the store's files are served on a free port instead "
                        "(set VLLAMA_STORE_PORT to choose one)", port)
            return _bind(host, 0, explicit=True)
        if exc.errno == errno.EADDRINUSE:
            raise StoreServerError(f"VLLAMA_STORE_PORT={port}: the port is taken on {host}; choose another, "
                                   "or 0 for any free port") from exc
        raise StoreServerError(f"cannot listen on {host}:{port} ({exc.strerror}); set VLLAMA_STORE_BIND to an "
                               "address of this machine (0.0.0.0: all of them)") from exc
