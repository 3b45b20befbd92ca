"""Blobs on a store's disk: files uploaded with ``POST /api/blobs/sha256:<hex>`` (Ollama's API),
kept until a model is made from them (workers/blob_models.py).

    <store root>/blobs/sha256-<hex>                       one blob, named by its content
    <store root>/blobs/.sha256-<hex>.<random>.partial     an upload or fetch under way

The API never keeps a blob: it streams the upload to one store's file server
(workers/peer_server.py, ``PUT /v1/blob/<hex>``), which hands it to ``BlobReceiver``. A store
asked to make a model from blobs it lacks fetches them from a store that has them
(``GET /v1/blob/<hex>``, ``fetch_blob``). Which store holds which blob is in Redis
(common/blob_catalog.py).

What must stay true:
- A blob is listed (on disk under its name, and in Redis) only once all its bytes arrived and
  their sha256 is the one it is named by: bytes go to a temporary file, hashed as they come,
  renamed into place only when they match. A mismatch, a disconnect or a full disk leaves
  nothing behind (and frees its disk reservation).
- An upload holds disk space before writing, in the same Redis reservations as pulls
  (workers/disk_space.py): all of it at once when its size is declared, else RESERVE_STEP at
  a time, so a blob that cannot fit fails saying so instead of filling the disk.
- Cleanup (``sweep``): a blob goes once it is older than BLOB_KEEP_S (a day from its upload,
  or from its last use: uploading it again or creating from it renews it) and no model uses
  it. A model made from safetensors blobs hard-links them into its directory, so "used" is a
  link count above one; deleting the model drops its links. A GGUF blob is converted, not
  linked, so it lasts its day and goes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response

from common.blob_catalog import blob_route
from common.catalog import StoreInfo
from common.errors import BadRequest, InsufficientStorage, Upstream, VllamaError
from common.redact import without_paths
from workers.disk_space import DiskReservations
from workers.store import ModelStore

log = logging.getLogger(__name__)

BLOB_KEEP_S = 24 * 3600
PARTIAL_STALE_S = 3600  # a temporary file untouched this long lost its writer (killed)
STAGING_STALE_S = 7 * 3600  # a GGUF's conversion folder: longer than the longest create job
SWEEP_EVERY_S = 600
RESERVE_STEP = 256 * 2**20  # an upload of unknown size holds this much more at a time
WRITE_CHUNK = 1 << 20  # bytes gathered before a write (in a thread: the loop serves others)
FETCH_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
SHA256 = re.compile(r"[0-9a-f]{64}")


def blob_dir(store: ModelStore) -> Path:
    return store.root / "blobs"


def blob_path(store: ModelStore, sha: str) -> Path:
    """Only ever called with a checked hex digest: the name cannot hold a separator."""
    if not SHA256.fullmatch(sha):
        raise ValueError(f"not a sha256 hex digest: {sha[:80]!r}")
    return blob_dir(store) / f"sha256-{sha}"


def list_blobs(store: ModelStore) -> dict[str, int]:
    """Every whole blob on disk: hex -> size."""
    found = {}
    folder = blob_dir(store)
    for path in folder.glob("sha256-*") if folder.is_dir() else []:
        sha = path.name.removeprefix("sha256-")
        if SHA256.fullmatch(sha):
            try:
                found[sha] = path.stat().st_size
            except FileNotFoundError:  # removed while listing
                continue
    return found


def touch(store: ModelStore, shas: list[str]) -> list[str]:
    """Renew the day of each blob present (it is being used); returns those missing. Callers
    hold the store's blob lock, so a blob found here is not swept a moment later."""
    missing = []
    for sha in shas:
        try:
            os.utime(blob_path(store, sha))
        except FileNotFoundError:
            missing.append(sha)
    return missing


def sweep(store: ModelStore, now: float | None = None) -> list[str]:
    """Remove what the cleanup rule (module docstring) says is no longer wanted; returns the
    hex digests of the blobs removed. Holds the store's blob lock, which creates take while
    they link blobs into a model, so a blob is never removed under a create using it."""
    now = time.time() if now is None else now
    folder = blob_dir(store)
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    with store.lock("blobs"):
        for path in folder.iterdir():
            try:
                st = path.lstat()
                if path.name.startswith("."):  # temporary: an upload, a fetch, a GGUF being converted
                    if path.is_dir() and now - st.st_mtime > STAGING_STALE_S:
                        shutil.rmtree(path)
                    elif not path.is_dir() and now - st.st_mtime > PARTIAL_STALE_S:
                        path.unlink()
                elif path.name.startswith("sha256-") and st.st_nlink == 1 and now - st.st_mtime > BLOB_KEEP_S:
                    path.unlink()
                    removed.append(path.name.removeprefix("sha256-"))
            except FileNotFoundError:
                continue
    if removed:
        log.info("removed %d blobs that no model uses, older than %d h", len(removed), BLOB_KEEP_S // 3600)
    return removed


# ---------------------------------------------------------------- uploads (the store's side)


class _Writer:
    """A blob's bytes on their way to disk: a temporary file, hashed as it grows."""

    def __init__(self, store: ModelStore, sha: str) -> None:
        self.target = blob_path(store, sha)
        self.tmp = self.target.with_name(f".{self.target.name}.{secrets.token_hex(4)}.partial")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed by close() or discard()
        self.digest = hashlib.sha256()
        self.written = 0

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.file.write(data)
        self.written += len(data)

    def finish(self) -> str:
        """Close; the hex sha256 of what was written (the file is not moved yet)."""
        self.file.close()
        return self.digest.hexdigest()

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class BlobReceiver:
    """Takes uploads for one store; ``recorded(sha, size)`` tells Redis of each new blob."""

    def __init__(self, store: ModelStore, reservations: DiskReservations,
                 recorded: Callable[[str, int], Awaitable[None]]) -> None:
        self.store = store
        self.reservations = reservations
        self.recorded = recorded

    async def receive(self, request: Request, sha: str) -> Response:
        """201 stored, 200 already here, 400 digest mismatch, 507 no room; the body is always
        read to its end, so the sender hears the answer rather than a broken connection."""
        declared = _declared_size(request)
        try:
            if await asyncio.to_thread(self._keep, sha):
                await _drain(request)
                await self.recorded(sha, blob_path(self.store, sha).stat().st_size)
                return JSONResponse({"status": "exists"}, status_code=200)
            return await self._store(request, sha, declared)
        except ClientDisconnect:  # the API (its client gone) gave up: nothing was kept, nobody listens
            return Response(status_code=400)

    def _keep(self, sha: str) -> bool:
        """Whether the blob is here; if so its day starts again (uploaded again: wanted)."""
        with self.store.lock("blobs"):
            return not touch(self.store, [sha])

    async def _store(self, request: Request, sha: str, declared: int | None) -> Response:
        reservation = f"blob {sha[:12]} {secrets.token_hex(6)}"
        shown = f"blob sha256:{sha[:12]}..."
        writer = await asyncio.to_thread(_Writer, self.store, sha)
        failure: VllamaError | None = None
        held_until = 0  # how far the upload may write before it must reserve more
        buffer = bytearray()

        async def make_room(upto: int) -> None:
            nonlocal held_until
            if upto <= held_until:
                return
            end = declared if declared is not None and declared >= upto else upto + RESERVE_STEP
            free = await asyncio.to_thread(self.store.free_bytes)
            await self.reservations.reserve(reservation, shown, end - writer.written, free, verb="upload")
            held_until = end

        async def flush() -> None:
            nonlocal failure
            try:
                await make_room(writer.written + len(buffer))
                await asyncio.to_thread(writer.write, bytes(buffer))
                await self.reservations.renew(reservation, held_until - writer.written)
            except VllamaError as exc:
                failure = exc
            except OSError as exc:  # the disk filled up under us, or failed
                failure = InsufficientStorage(f"writing {shown} failed ({without_paths(str(exc))}); free some space "
                                              "in the model store (ollama rm NAME), then upload again")
            buffer.clear()
            if failure is not None:
                await asyncio.to_thread(writer.discard)

        try:
            if declared is not None:  # all of it before a byte is read
                try:
                    await make_room(declared)
                except VllamaError as exc:
                    failure = exc
                    await asyncio.to_thread(writer.discard)
            async for chunk in request.stream():
                if failure is not None:
                    continue  # read to the end, keeping nothing: the sender then reads our answer
                buffer += chunk
                if len(buffer) >= WRITE_CHUNK:
                    await flush()
            if failure is None and buffer:
                await flush()
            if failure is not None:
                return _error(failure)
            got = await asyncio.to_thread(writer.finish)
            if got != sha:
                return _error(BadRequest(f'digest mismatch, expected "sha256:{sha}", got "sha256:{got}"'))
            await asyncio.to_thread(os.replace, writer.tmp, writer.target)
            log.info("stored blob sha256:%s (%d bytes)", sha, writer.written)
            await self.recorded(sha, writer.written)
            return JSONResponse({"status": "created"}, status_code=201)
        finally:
            if not writer.file.closed:
                writer.file.close()
            writer.tmp.unlink(missing_ok=True)
            await asyncio.shield(self.reservations.release(reservation))


def _error(exc: VllamaError) -> JSONResponse:
    return JSONResponse({"error": exc.message, "code": str(exc.code)}, status_code=exc.status)


def _declared_size(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


async def _drain(request: Request) -> None:
    async for _ in request.stream():
        pass


def serve(store: ModelStore, sha: str) -> Response:
    path = blob_path(store, sha)
    if not path.is_file():
        return Response(f"blob sha256:{sha} is not in this store\n", status_code=404, media_type="text/plain")
    return FileResponse(path)


# ---------------------------------------------------------------- fetching from another store


def fetch_blob(store: ModelStore, sha: str, size: int, sources: list[StoreInfo]) -> None:
    """Blob ``sha`` from the first of ``sources`` (live stores holding it) that gives its exact
    bytes; Upstream naming each store's failure if none does. The caller has reserved the
    space. Nothing is kept of a failed fetch."""
    reasons = []
    for source in sources:
        writer = _Writer(store, sha)
        try:
            _download(source, sha, size, writer)
            got = writer.finish()
            if got != sha:
                raise _Refused(f"its bytes hash to sha256:{got[:12]}..., not the blob's digest")
            os.replace(writer.tmp, writer.target)
            return
        except _Refused as exc:
            log.warning("fetching blob sha256:%s from store %s: %s", sha[:12], source.store_id, exc)
            reasons.append(f"store {source.store_id}: {exc}")
        finally:
            writer.discard()
    raise Upstream(f"could not fetch blob sha256:{sha[:12]}... from the stores that hold it ("
                   f"{'; '.join(reasons) or 'no live store serves it'}); upload it again (POST /api/blobs/sha256:{sha})")


class _Refused(Exception):
    """One store could not give the blob; the message says why."""


def _download(source: StoreInfo, sha: str, size: int, writer: _Writer) -> None:
    if source.url is None:
        raise _Refused("it serves no files to other machines")
    try:
        with httpx.stream("GET", source.url + blob_route(sha), headers={"Authorization": f"Bearer {source.token}"},
                          timeout=FETCH_TIMEOUT) as response:
            if response.status_code != 200:
                raise _Refused(f"it answered HTTP {response.status_code}")
            for chunk in response.iter_bytes(WRITE_CHUNK):
                if writer.written + len(chunk) > size:
                    raise _Refused(f"it has more than the {size} bytes it listed")
                writer.write(chunk)
    except httpx.HTTPError as exc:
        raise _Refused(f"it did not answer at {source.url} ({type(exc).__name__}); is its pull worker running?") from exc
