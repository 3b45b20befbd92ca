"""A model store on disk: one directory (``VLLAMA_HOME/models``) per machine.

    manifests/<name>.json   one per model name (common.catalog.Manifest)
    hub/                    Hugging Face cache: models--org--name/{blobs,snapshots/<commit>}
    local/<id>/             models made from a local GGUF file (converted to safetensors)
    locks/                  file locks: one pull or import of a repo/file at a time

A manifest is written last, atomically, once every file is in place and verified, so a model
that is listed is complete; a crash halfway leaves files and no manifest, and the next pull
finds the files already there. Names reach the filesystem only through ``store_filename``,
which cannot produce a path separator.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import clock
from common.catalog import Manifest, ManifestFile
from common.model_info import ModelDescription, with_options
from common.models import ALIASES, canonical_name, is_repo_id, name_from_store_filename, name_key, store_filename

log = logging.getLogger(__name__)


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifests = root / "manifests"
        self.hub = root / "hub"
        self.local = root / "local"
        self._locks = root / "locks"

    # ------------------------------------------------------------ manifests

    def list(self) -> list[Manifest]:
        found = []
        if not self.manifests.is_dir():
            return found
        for file in sorted(self.manifests.glob("*.json")):
            try:
                name_from_store_filename(file.stem)
                found.append(Manifest.model_validate_json(file.read_bytes()))
            except Exception:  # noqa: BLE001 - one bad file must not hide the other models
                log.warning("ignoring unreadable manifest %s", file, exc_info=True)
        return found

    def get(self, name: str) -> Manifest | None:
        """The manifest of ``name``; a repo id matches in any case (``QWEN/x`` finds ``Qwen/x``)."""
        file = self._manifest_file(name)
        if not file.exists():
            file = next(iter(self._other_spellings(name)), None)
            if file is None:
                return None
        return Manifest.model_validate_json(file.read_bytes())

    def save(self, manifest: Manifest) -> None:
        """Written whole, then renamed into place; a repo id spelt in another case before is
        replaced, so one model has one manifest under one spelling."""
        self.manifests.mkdir(parents=True, exist_ok=True)
        file = self._manifest_file(manifest.name)
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(manifest.model_dump_json(indent=1))
        os.replace(tmp, file)
        for other in self._other_spellings(manifest.name):
            other.unlink(missing_ok=True)

    def _other_spellings(self, name: str) -> list[Path]:
        """Manifest files of ``name`` (a repo id) spelt in another case."""
        if not is_repo_id(canonical_name(name)) or not self.manifests.is_dir():
            return []
        key, exact = name_key(name), self._manifest_file(name).name
        found = []
        for file in sorted(self.manifests.glob("*.json")):
            try:
                if file.name != exact and name_key(name_from_store_filename(file.stem)) == key:
                    found.append(file)
            except ValueError:
                continue
        return found

    def version(self) -> frozenset:
        """Changes whenever a manifest is added, replaced or removed.

        Built from each manifest file's inode, mtime and size rather than the directory's
        mtime: file times tick coarsely (milliseconds), so a temporary file and the rename
        that replaces it can leave the directory's mtime unchanged, and a listing taken in
        between would never be noticed as stale."""
        try:
            return frozenset((f.name, st.st_ino, st.st_mtime_ns, st.st_size)
                             for f in self.manifests.glob("*.json") for st in [f.stat()])
        except FileNotFoundError:  # the directory, or a manifest removed while listing
            return frozenset({("<changing>", time.monotonic_ns())})

    def model_dir(self, manifest: Manifest) -> Path:
        """The directory vLLM loads; refuses a manifest that points outside the store."""
        path = (self.root / manifest.path).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"manifest of {manifest.name} points outside the model store: {manifest.path}")
        return path

    def _manifest_file(self, name: str) -> Path:
        return self.manifests / f"{store_filename(name)}.json"

    # ------------------------------------------------------------ delete and copy

    def copy(self, source: str, destination: str) -> Manifest | None:
        """A second name for the same files (nothing is copied, as in Ollama)."""
        manifest = self.get(source)
        if manifest is None:
            return None
        if name_key(source) == name_key(destination):  # one model spelt twice: nothing to copy
            return manifest
        copied = manifest.model_copy(update={"name": destination, "modified_at": clock.now()})
        self.save(copied)
        return copied

    def create(self, source: str, destination: str, changes: dict[str, Any]) -> Manifest | None:
        """A model made from ``source``: the same files (as a copy), with ``changes`` to its
        description (system, messages, options, license; common/model_defaults.py)."""
        manifest = self.get(source)
        if manifest is None:
            return None
        created = manifest.model_copy(update={"name": destination, "modified_at": clock.now(),
                                              "description": with_changes(manifest.description, changes)})
        self.save(created)
        return created

    def delete(self, name: str) -> Manifest | None:
        """Remove a name, and its files when no other name uses them."""
        manifest = self.get(name)
        if manifest is None:
            return None
        self._manifest_file(manifest.name).unlink(missing_ok=True)
        if any(m.path == manifest.path for m in self.list()):
            return manifest  # another name (a copy) still uses the files
        if manifest.repo:
            with self.repo_lock(manifest.repo):
                self._delete_hub_revision(manifest.repo, manifest.commit)
        else:
            shutil.rmtree(self.model_dir(manifest), ignore_errors=True)
        return manifest

    def _delete_hub_revision(self, repo: str, commit: str | None) -> None:
        from huggingface_hub import scan_cache_dir

        if not self.hub.is_dir():
            return
        cache = scan_cache_dir(self.hub)
        for cached in cache.repos:
            if cached.repo_id == repo and cached.repo_type == "model":
                commits = [r.commit_hash for r in cached.revisions if commit in (None, r.commit_hash)]
                if len(commits) == len(cached.revisions):
                    shutil.rmtree(cached.repo_path, ignore_errors=True)  # refs and all
                elif commits:
                    # Blobs shared with a revision that stays are kept.
                    cache.delete_revisions(*commits).execute()

    # ------------------------------------------------------------ what pulls leave behind

    def delete_leftovers(self, name: str) -> int:
        """Remove what failed or interrupted pulls of ``name`` left (no manifest lists them):
        the Hub cache of its repo, but for the revisions some manifest uses. Returns how many
        files and folders went; 0 when there was nothing."""
        name = canonical_name(name)
        source = ALIASES.get(name)
        repo = source.hf_repo if source is not None else (name.split("@", 1)[0] if is_repo_id(name) else None)
        if repo is None or source is not None and source.bundled:
            return 0
        with self.repo_lock(repo):
            return self.prune_repo(repo)

    def prune_repo(self, repo: str, *, keep_complete: bool = False) -> int:
        """Remove the files of ``repo``'s Hub cache that no manifest uses; the caller holds its
        repo_lock. Partial downloads (``*.incomplete``: huggingface_hub never resumes them in
        another process) always go; with ``keep_complete``, whole files stay, for the next
        pull to reuse. Returns how many files and folders went."""
        used = {m.commit for m in self.list() if m.repo and m.repo.lower() == repo.lower()}
        removed = 0
        for folder in self._repo_folders(repo):
            blobs = folder / "blobs"
            for partial in blobs.glob("*.incomplete"):
                partial.unlink(missing_ok=True)
                removed += 1
            if keep_complete:
                continue
            snapshots = folder / "snapshots"
            for snapshot in (snapshots.iterdir() if snapshots.is_dir() else []):
                if snapshot.name not in used:
                    shutil.rmtree(snapshot, ignore_errors=True)
                    removed += 1
            kept = [s for s in snapshots.iterdir()] if snapshots.is_dir() else []
            if not kept:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
                continue
            needed = {p.resolve() for s in kept for p in s.rglob("*")}
            for blob in (blobs.iterdir() if blobs.is_dir() else []):
                if blob.resolve() not in needed:
                    blob.unlink(missing_ok=True)
                    removed += 1
            for ref in [r for r in (folder / "refs").rglob("*") if r.is_file()]:
                if ref.read_text().strip() not in used:
                    ref.unlink(missing_ok=True)
        return removed

    def _repo_folders(self, repo: str) -> list[Path]:
        """The Hub cache folders of ``repo``, in any case (older versions kept the spelling asked)."""
        wanted = "models--" + repo.replace("/", "--").lower()
        if not self.hub.is_dir():
            return []
        return sorted(p for p in self.hub.iterdir() if p.is_dir() and p.name.lower() == wanted)

    # ------------------------------------------------------------ helpers for writers

    def repo_lock(self, repo: str) -> contextlib.AbstractContextManager[None]:
        """One writer of a repo's Hub cache at a time, whatever case the repo id is spelt in."""
        return self.lock(f"repo-{repo.lower()}")

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Across processes of one machine (a pull worker and a worker loading a model)."""
        self._locks.mkdir(parents=True, exist_ok=True)
        path = self._locks / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".lock")
        with open(path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def free_bytes(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free


def with_changes(description: ModelDescription, changes: dict[str, Any]) -> ModelDescription:
    """``description`` with /api/create's ``changes`` (api/model_wire.py CreateRequest.changes):
    options merged onto what the model was made with, the rest replaced."""
    update = dict(changes)
    if "options" in changes:
        update["options"] = {**description.options, **changes["options"]}
        update["parameters"] = with_options(description.parameters, changes["options"])
    return description.model_copy(update=update)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(model_dir: Path) -> list[ManifestFile]:
    """Every file of a directory with its sha256 (for models made here, not pulled)."""
    return [
        ManifestFile(path=str(p.relative_to(model_dir)), size=p.stat().st_size, digest=f"sha256:{file_sha256(p)}")
        for p in sorted(model_dir.rglob("*")) if p.is_file()
    ]
