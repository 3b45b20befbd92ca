"""A model made from uploaded blobs (/api/create with ``files``), in one store.

Runs in a pull worker's thread as a store job. Either one GGUF file, converted as
``vllama create --from FILE.gguf`` does (workers/pull.py import_gguf), or a safetensors model
directory, assembled from the blobs under the client's file names: each blob hard-linked into
``local/blobs-<digest>`` (named after the content, so the same files under another model name
share it), checked as a loader will read it, and the manifest saved last.

What must stay true:
- File names are the client's: each is checked again here (common/uploaded_models.py), and the
  assembled directory must pass the same checks as a pulled one (common/model_paths.py), so
  nothing is written or read outside the model's directory.
- A model that is refused leaves nothing: the directory is assembled in ``.partial`` and
  renamed into place only once it passed; the manifest comes after.
- Blobs this store lacks are fetched from the stores holding them first (workers/blobs.py),
  each checked against its digest, within a disk reservation.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import struct
from pathlib import Path
from typing import Any

from common import clock
from common.catalog import Manifest, ManifestFile, StoreInfo
from common.errors import BadRequest
from common.model_info import describe
from common.model_paths import model_dir_problems
from common.protocol import PullState
from common.uploaded_models import upload_kind
from workers.blobs import blob_dir, blob_path, fetch_blob, touch
from workers.disk_space import FreeSpace, Space
from workers.pull import Progress, import_gguf
from workers.store import ModelStore, with_changes

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
MAX_SAFETENSORS_HEADER = 100 * 2**20  # safetensors' own limit


def create_from_blobs(store: ModelStore, name: str, files: dict[str, str], changes: dict[str, Any],
                      holders: dict[str, list[StoreInfo]], sizes: dict[str, int],
                      space: Space | None = None) -> tuple[Manifest, list[str]]:
    """Make ``name`` from ``files`` (file name -> sha256 hex). ``holders`` and ``sizes``: the
    other live stores holding each blob, and its size, for the blobs this store lacks.
    Returns the manifest saved and the blobs fetched here."""
    kind = upload_kind(files)
    fetched = _have_blobs(store, name, sorted(set(files.values())), holders, sizes, space or FreeSpace(store.free_bytes))
    if kind == "gguf":
        [(_, sha)] = files.items()
        return _from_gguf(store, name, sha, changes), fetched
    return _from_safetensors(store, name, files, changes), fetched


def _have_blobs(store: ModelStore, name: str, shas: list[str], holders: dict[str, list[StoreInfo]],
                sizes: dict[str, int], space: Space) -> list[str]:
    """Every blob on this store's disk, fetching those it lacks; their day renewed (used now)."""
    with store.lock("blobs"):  # not swept between this check and the links made below
        missing = touch(store, shas)
    for sha in missing:
        if not holders.get(sha):
            raise BadRequest(f"blob sha256:{sha} not found; upload it first with POST /api/blobs/sha256:{sha}")
    if missing:
        space.reserve(f"the files of {name}", sum(sizes.get(sha, 0) for sha in missing))
        for sha in missing:
            log.info("fetching blob sha256:%s for %s from %s", sha[:12], name,
                     ", ".join(s.store_id for s in holders[sha]))
            fetch_blob(store, sha, sizes[sha], holders[sha])
    return missing


def _from_gguf(store: ModelStore, name: str, sha: str, changes: dict[str, Any]) -> Manifest:
    blob = blob_path(store, sha)
    with open(blob, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise BadRequest(f"blob sha256:{sha[:12]}... is named .gguf but is not a GGUF file; upload the model's "
                             ".gguf file itself")
    # The converter knows a GGUF by its file name: it reads the blob through a link named so,
    # in a folder of its own that the blob sweep removes if this process dies mid-way.
    folder = blob_dir(store) / f".gguf-{sha[:16]}-{secrets.token_hex(4)}"
    folder.mkdir()
    try:
        link = folder / "model.gguf"
        _link(blob, link)
        silent = Progress(PullState(model=name, store_id="local"))
        return import_gguf(store, name, link, silent, changes=changes, made_from=f"sha256:{sha}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _from_safetensors(store: ModelStore, name: str, files: dict[str, str], changes: dict[str, Any]) -> Manifest:
    listed = [ManifestFile(path=path, size=blob_path(store, sha).stat().st_size, digest=f"sha256:{sha}")
              for path, sha in sorted(files.items())]
    digest = Manifest.digest_of(listed)
    target = store.local / f"blobs-{digest[:16]}"
    with store.lock(f"blobs-{target.name}"):
        if not _complete(target, listed):
            shutil.rmtree(target, ignore_errors=True)
            staging = target.with_name(target.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            try:
                with store.lock("blobs"):  # the blobs stay until they are linked
                    for f in listed:
                        dest = staging / f.path
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        _link(blob_path(store, f.digest[7:]), dest)
                problems = model_dir_problems(staging, store.root, set(files)) + _loading_problems(staging)
                if problems:
                    raise BadRequest(f"the uploaded files cannot make a model: {'; '.join(problems[:3])}; "
                                     "fix the model directory and create it again")
                staging.rename(target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        try:
            description = describe(target)
        except ValueError as exc:
            raise BadRequest(f"the uploaded files cannot make a model: {exc}; fix config.json and create it "
                             "again") from None
        manifest = Manifest(name=name, path=str(target.relative_to(store.root)), files=listed,
                            size=sum(f.size for f in listed), digest=digest, modified_at=clock.now(),
                            description=with_changes(description, changes))
        store.save(manifest)
    return manifest


def _complete(target: Path, listed: list[ManifestFile]) -> bool:
    """Renamed into place only once checked; the sizes say it is still whole."""
    try:
        return all((target / f.path).stat().st_size == f.size for f in listed)
    except OSError:
        return False


def _link(blob: Path, dest: Path) -> None:
    """The blob's bytes at ``dest`` without a copy; a copy where the disk cannot link."""
    try:
        os.link(blob, dest)
    except OSError:
        shutil.copyfile(blob, dest)


def _loading_problems(model_dir: Path) -> list[str]:
    """What would stop a loader reading this directory, short of loading it: config.json that is
    a JSON object naming its architecture, and safetensors files whose headers parse."""
    problems = []
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict) or not (config.get("architectures") or config.get("model_type")):
            problems.append("config.json names no architectures or model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        problems.append("config.json is not readable JSON")
    for weights in sorted(model_dir.rglob("*.safetensors")):
        if (why := _safetensors_problem(weights)) is not None:
            problems.append(f"{weights.relative_to(model_dir)} {why}")
    return problems


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte little-endian header length, a JSON header, the tensors."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return "is too short to be a safetensors file"
            (length,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if length > MAX_SAFETENSORS_HEADER or 8 + length > size:
                return "is not a safetensors file (its header length is impossible)"
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "is not a safetensors file (its header is not an object)"
    ends = [t["data_offsets"][1] for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and isinstance(t.get("data_offsets"), list)
            and len(t["data_offsets"]) == 2 and isinstance(t["data_offsets"][1], int)]
    if ends and 8 + length + max(ends) > size:
        return "is cut short (its tensors end past the file's end)"
    return None
