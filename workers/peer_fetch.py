"""Fetching a model from another machine's store: models that no Hub repo can give again.

A model made with ``vllama create --from FILE.gguf`` (or copied from one) exists only on the
machines that made it. Any other machine's worker that must load it, or pull worker asked to
pull it, fetches its files from a live store holding the same manifest (workers/peer_server.py),
file by file, trying the next such store when one fails.

What must stay true:
- Every file is streamed to a temporary file, its size and sha256 checked against the manifest
  from Redis, and only then moved into a staging directory; the staging directory is renamed
  into place (``local/peer-<digest>``, named after the content, so copies share it) once every
  file is there, and the manifest is saved last. A listed model is therefore complete and
  verified, and a fetch that fails leaves nothing of the model behind.
- Paths come from a manifest, which another machine wrote: one that is absolute or climbs out
  with ``..`` is refused before anything is written, and index files fetched may name only
  the model's own files (common/model_paths.py).
- A model this store already has is left as it is: a peer never overwrites a local model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

import httpx

from common.catalog import CatalogEntry, Manifest, ManifestFile, StoreInfo
from common.errors import Unavailable, Upstream, VllamaError
from common.model_paths import path_problem
from common.protocol import PullFile
from common.redact import without_paths
from workers.peer_server import FILE_ROUTE
from workers.disk_space import FreeSpace, Space
from workers.pull import Progress, check_model_dir
from workers.store import ModelStore

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT = httpx.Timeout(60.0, connect=10.0)  # per read: a busy peer may pause, a dead one is noticed
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _SourceFailed(Exception):
    """One store could not give one file; the message says why and what to do."""


def fetch_from_peers(store: ModelStore, name: str, entry: CatalogEntry, progress: Progress,
                     space: Space | None = None) -> Manifest:
    """``name`` into ``store`` from the live stores that hold it (``entry.sources``);
    ``space`` holds the disk space it needs first (workers/disk_space.py)."""
    local = store.get(name)
    if local is not None:
        progress.add_files([PullFile(path=f.path, digest=f.digest, total=f.size, completed=f.size)
                            for f in local.files])
        return local
    manifest = entry.manifest
    _check(manifest)
    shown = name.removesuffix(":latest")
    if not entry.sources:
        raise Unavailable(
            f"model '{shown}' is on store(s) {', '.join(entry.stores)}, but none of them serves its files to "
            "other machines (their pull workers are older than this one, or could not open their port: see "
            "VLLAMA_STORE_PORT in their logs); restart them, or create the model on this machine too "
            f"(vllama create {shown} --from FILE.gguf)")
    progress.phase("manifest")
    progress.add_files([PullFile(path=f.path, digest=f.digest, total=f.size) for f in manifest.files])
    target = store.local / f"peer-{manifest.digest[:16]}"
    with store.lock(f"peer-{target.name}"):
        if _complete(target, manifest):
            for f in manifest.files:
                progress.advance(f.path, f.size)
        else:
            shutil.rmtree(target, ignore_errors=True)
            (space or FreeSpace(store.free_bytes)).reserve(name, manifest.size)
            progress.phase("downloading")
            log.info("fetching %s from store(s) %s", name, ", ".join(s.store_id for s in entry.sources))
            _fetch_all(target, name, manifest, entry.sources, progress, store)
        progress.phase("verifying")  # each file was checked as it arrived
        check_model_dir(store, name, target, {f.path for f in manifest.files})  # one fetched earlier
        progress.phase("writing")
        saved = manifest.model_copy(update={"path": str(target.relative_to(store.root))})
        store.save(saved)
    return saved


def _check(manifest: Manifest) -> None:
    """Refuse a manifest whose paths would write outside the model's directory, or whose
    digests cannot be checked."""
    problem = None
    if not _SHA256.fullmatch(manifest.digest) or manifest.digest != Manifest.digest_of(manifest.files):
        problem = "its digest does not match its files"
    seen: set[str] = set()
    for f in manifest.files:
        if path_problem(f.path) is not None or f.path in seen:
            problem = f"it names the file {f.path!r}"
        elif not (f.digest.startswith("sha256:") and _SHA256.fullmatch(f.digest[7:])) or f.size < 0:
            problem = f"the digest or size of {f.path} is not a sha256 and a size"
        seen.add(f.path)
    if problem:
        raise VllamaError(f"the manifest of {manifest.name} in Redis cannot be fetched: {problem}; "
                          "remove the model (ollama rm) and create it again")


def _complete(target: Path, manifest: Manifest) -> bool:
    """A directory renamed into place only after every file was verified; the sizes say it
    is still whole."""
    try:
        return all((target / f.path).stat().st_size == f.size for f in manifest.files)
    except OSError:
        return False


def _fetch_all(target: Path, name: str, manifest: Manifest, sources: list[StoreInfo], progress: Progress,
               store: ModelStore) -> None:
    """Into a staging directory renamed into place once every file is there and its index
    files name only its own files: a model refused leaves nothing behind."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a process killed mid-fetch
    try:
        for f in manifest.files:
            _fetch_file(staging, name, f, sources, progress)
        check_model_dir(store, name, staging, {f.path for f in manifest.files},
                        f"the files of model '{name.removesuffix(':latest')}' on the other machines")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fetch_file(staging: Path, name: str, f: ManifestFile, sources: list[StoreInfo], progress: Progress) -> None:
    dest = staging / f.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    reasons = []
    for source in sources:
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
        try:
            _download(source, name, f, tmp, progress)
            os.replace(tmp, dest)
            return
        except _SourceFailed as exc:
            log.warning("fetching %s of %s from store %s: %s", f.path, name, source.store_id, exc)
            reasons.append(f"store {source.store_id}: {exc}")
        except OSError as exc:  # our own disk: another store would not help
            raise Upstream(f"writing {f.path} of {name} failed ({without_paths(str(exc))}); check the disk of this "
                           "machine's model store (VLLAMA_HOME), then try again") from exc
        finally:
            tmp.unlink(missing_ok=True)
    raise Upstream(f"could not fetch model '{name.removesuffix(':latest')}' from the machines that have it, "
                   f"and kept nothing of it here: {'; '.join(reasons)}")


def _download(source: StoreInfo, name: str, f: ManifestFile, tmp: Path, progress: Progress) -> None:
    """One file from one store into ``tmp``, checked as it streams; _SourceFailed if not."""
    assert source.url is not None
    progress.advance(f.path, 0)
    digest = hashlib.sha256()
    written = 0
    try:
        with httpx.stream("GET", source.url + FILE_ROUTE, params={"model": name, "path": f.path},
                          headers={"Authorization": f"Bearer {source.token}"}, timeout=TIMEOUT) as response:
            if response.status_code == 401:
                raise _SourceFailed("it refused our token (its pull worker restarted since the model was "
                                    "looked up); try again")
            if response.status_code == 404:
                raise _SourceFailed(f"it no longer has {f.path}")
            if response.status_code != 200:
                raise _SourceFailed(f"it answered HTTP {response.status_code} for {f.path}")
            with open(tmp, "wb") as out:
                for chunk in response.iter_bytes(CHUNK):
                    written += len(chunk)
                    if written > f.size:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    progress.advance(f.path, written)
    except httpx.HTTPError as exc:
        raise _SourceFailed(f"it did not answer at {source.url} ({type(exc).__name__}: {exc}); is its pull "
                            "worker running, and is that address reachable from this machine "
                            "(VLLAMA_STORE_ADVERTISE)?") from exc
    if written != f.size:
        raise _SourceFailed(f"{f.path} has {'more' if written > f.size else 'fewer'} bytes there than the "
                            f"{f.size} its manifest lists: the file changed on that machine after the model "
                            "was made; make the model there again")
    got = digest.hexdigest()
    if f"sha256:{got}" != f.digest:
        raise _SourceFailed(f"{f.path} does not match its manifest (sha256 {got[:12]}..., expected "
                            f"{f.digest[7:19]}...): the file changed on that machine after the model was made; "
                            "make the model there again")
