"""Getting a model into a store: pulled from the Hugging Face Hub, or made from a GGUF file
or a zipped model directory (the bundled models).

All run in a thread (huggingface_hub and transformers block) and report through a
``Progress``, which the pull worker turns into pull frames. Only what vLLM needs is fetched:
the repo's top-level safetensors weights (or .bin weights when there are none), configs,
tokenizer files, chat templates and the license, and a sentence-transformers model's pooling
steps (``1_Pooling/config.json``, ...); not the ``original/`` checkpoints or GGUF, ONNX and
other copies that many repos also carry.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import threading
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

from common import clock
from common.catalog import CatalogEntry, Manifest, ManifestFile
from common.errors import ErrorCode, Forbidden, InsufficientStorage, ModelNotFound, Upstream, VllamaError
from common.model_info import describe
from common.model_paths import model_dir_problems, path_problem
from common.models import ModelSource, is_repo_id, source_for, with_repo_spelling
from common.protocol import PullFile, PullState, PullStatus, PushState, PushStatus
from common.redact import without_paths
from workers.disk_space import FreeSpace, Space
from workers.store import ModelStore, describe_files, file_sha256, with_changes

TEMPLATES = Path(__file__).resolve().parent.parent / "common" / "chat_templates"

log = logging.getLogger(__name__)

PARALLEL_FILES = 4
_SUPPORT_SUFFIXES = (".json", ".model", ".tiktoken", ".txt", ".jinja")
_LICENSE_NAMES = {"LICENSE", "LICENSE.md", "LICENSE.txt"}
_SENTENCE_STEP = re.compile(r"\d+_[A-Za-z]+/[^/]+\.(?:json|safetensors)")


State = TypeVar("State", PullState, PushState)


class Progress(Generic[State]):
    """A pull's (or a push's) state, updated from the threads moving its files; ``notify`` is
    called after each change and must be thread-safe (the pull worker hands it to its event
    loop)."""

    def __init__(self, state: State, notify: Callable[[], None] = lambda: None) -> None:
        self.state = state
        self._notify = notify
        self._lock = threading.Lock()

    def phase(self, status: PullStatus | PushStatus) -> None:
        with self._lock:
            self.state.status = status
            self.state.updated_at = clock.now()
        self._notify()

    def add_files(self, files: list[PullFile]) -> None:
        with self._lock:
            self.state.files = files
        self._notify()

    def advance(self, path: str, completed: int) -> None:
        with self._lock:
            for f in self.state.files:
                if f.path == path:
                    f.completed = max(0, min(completed, f.total))
            self.state.updated_at = clock.now()
        self._notify()

    def snapshot(self) -> State:
        with self._lock:
            return self.state.model_copy(deep=True)


def pull(store: ModelStore, name: str, progress: Progress, entry: CatalogEntry | None = None,
         space: Space | None = None) -> Manifest:
    """Pull ``name`` into ``store``: the bundled model is imported from its package; a model
    the cluster already has (``entry``, from the Redis catalog) comes from where it came from
    (its Hub repo), or, made from a GGUF file on another machine, from a store holding it;
    anything else (an alias or a repo id) from the Hub. ``space`` holds the disk space the pull
    needs before it writes (workers/disk_space.py). The manifest saved may spell a repo id as
    the Hub does, not as asked (``QWEN/x`` is kept as ``Qwen/x``)."""
    space = space or FreeSpace(store.free_bytes)
    source = source_for(name)
    if entry is not None:
        name = entry.manifest.name if is_repo_id(name) and is_repo_id(entry.manifest.name) else name
    if source is not None and source.bundled:
        return import_bundled(store, name, source, progress)
    if entry is not None and not entry.manifest.repo:
        from workers.peer_fetch import fetch_from_peers

        return fetch_from_peers(store, name, entry, progress, space)
    if source is None and entry is not None and entry.manifest.repo:  # a copy of a pulled model
        return pull_from_hub(store, name, entry.manifest.repo, entry.manifest.commit or "main", progress, space)
    if source is None:
        raise ModelNotFound(name, f"pull model manifest: '{name}' is not a model vLLama knows; use a "
                                  "Hugging Face repo id (org/name) or a name from `vllama suggest --all`")
    return pull_from_hub(store, name, source.hf_repo, source.revision, progress, space)


def ensure_local(store: ModelStore, name: str, entry: CatalogEntry | None, space: Space | None = None) -> Path:
    """The directory to load ``name`` from, fetching it first when this machine lacks it
    but another store has it (``entry``, from the Redis catalog) or it is bundled. A model
    with a Hub repo is fetched from the Hub (whose hashes vouch for it); one made from a GGUF
    file elsewhere, from a store holding it (workers/peer_fetch.py). A directory whose files
    lead out of the store, or whose index names files outside it, is refused."""
    manifest = store.get(name)
    if manifest is None:
        silent = Progress(PullState(model=name, store_id="local"))
        space = space or FreeSpace(store.free_bytes)
        source = source_for(name)
        if source is not None and source.bundled:
            manifest = import_bundled(store, name, source, silent)
        elif entry is not None and entry.manifest.repo:
            log.info("%s is not on this machine yet; fetching %s", name, entry.manifest.repo)
            manifest = pull_from_hub(store, name, entry.manifest.repo, entry.manifest.commit or "main", silent, space)
        elif entry is not None:
            from workers.peer_fetch import fetch_from_peers

            log.info("%s is not on this machine yet; fetching it from store(s) %s", name, ", ".join(entry.stores))
            manifest = fetch_from_peers(store, name, entry, silent, space)
        else:
            raise ModelNotFound(name)
    model_dir = store.model_dir(manifest)
    check_model_dir(store, manifest.name, model_dir, {f.path for f in manifest.files})
    return model_dir


def check_model_dir(store: ModelStore, name: str, model_dir: Path, listed: set[str] | None,
                    fetched: str | None = None) -> None:
    """Refuse a model whose files would let a reader leave the store (see common/model_paths.py).
    ``fetched``: what was being fetched, when the files have just arrived (502: what the source
    gave is unusable, and nothing of it is kept); else the model is in the store (500)."""
    problems = model_dir_problems(model_dir, store.root, listed)
    if not problems:
        return
    shown = name.removesuffix(":latest")
    found = "; ".join(problems[:3])
    if fetched is not None:
        raise VllamaError(f"{fetched}: {found}; vLLama keeps nothing of it", ErrorCode.UPSTREAM)
    raise VllamaError(f"model '{shown}' cannot be used: {found}; remove it (ollama rm {shown})", ErrorCode.INTERNAL)


# ---------------------------------------------------------------- from the Hub


def pull_from_hub(store: ModelStore, name: str, repo: str, revision: str, progress: Progress,
                  space: Space | None = None) -> Manifest:
    """``repo`` at ``revision`` into the store's Hub cache, saved as ``name``. The Hub answers
    a repo id in any case with its own spelling, and that spelling is what is kept: the cache
    folder, the manifest's repo, and a repo-id ``name`` (so ``QWEN/x`` and ``Qwen/x`` are one
    model, fetched once). A pull that fails removes its partial files, and, unless the Hub or
    the network failed (the next pull reuses whole files then), every file it fetched."""
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

    space = space or FreeSpace(store.free_bytes)
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: tests and operators set it late
    api = HfApi(endpoint=endpoint)
    progress.phase("manifest")
    with _hub_errors(name, repo, revision):
        info = api.model_info(repo, revision=revision)
        if isinstance(info.id, str) and info.id.lower() == repo.lower():
            repo = info.id  # the Hub's spelling
        commit = info.sha
        tree = [e for e in api.list_repo_tree(repo, revision=commit, recursive=True) if hasattr(e, "blob_id")]
    name = with_repo_spelling(name, repo)
    wanted = select_files(tree, repo)
    if not any(_is_weights(e.path) for e in wanted):
        raise ModelNotFound(name, f"{repo} has no safetensors (or .bin) weights at its top level; "
                                  "vLLama cannot serve it")
    files = [PullFile(path=e.path, digest=_display_digest(e), total=e.size) for e in wanted]
    cached = {e.path for e in wanted if isinstance(try_to_load_from_cache(repo, e.path, store.hub, commit), str)}
    for f in files:
        if f.path in cached:
            f.completed = f.total
    progress.add_files(files)
    space.reserve(name, sum(e.size for e in wanted if e.path not in cached))

    paths: dict[str, Path] = {}
    with store.repo_lock(repo):
        network = False  # the Hub or the network failed: whole files are kept for the next pull
        try:
            try:
                with _hub_errors(name, repo, revision):
                    progress.phase("downloading")

                    def fetch(path: str) -> None:
                        paths[path] = Path(hf_hub_download(
                            repo, path, revision=commit, cache_dir=store.hub, endpoint=endpoint,
                            tqdm_class=_bar_for(path, progress),
                        ))
                        progress.advance(path, 1 << 62)

                    _run_all(fetch, [e.path for e in wanted])
                    progress.phase("verifying")
                    for entry in wanted:
                        if entry.path not in cached:
                            _verify(entry, paths[entry.path])
            except Upstream:
                network = True
                raise
            # The snapshot's root: any file's path less its place in the repo (the first one
            # fetched may be a sentence-transformers step's, such as 1_Pooling/config.json).
            relative, local = next(iter(paths.items()))
            model_dir = local.parents[len(Path(relative).parts) - 1]
            check_model_dir(store, name, model_dir, {e.path for e in wanted}, f"{repo} is not usable")
            progress.phase("writing")
            manifest_files = [ManifestFile(path=f.path, size=f.total, digest=f.digest) for f in files]
            manifest = Manifest(
                name=name, repo=repo, commit=commit, path=str(model_dir.relative_to(store.root)),
                files=manifest_files, size=sum(f.size for f in manifest_files),
                digest=Manifest.digest_of(manifest_files), modified_at=clock.now(), description=describe(model_dir),
            )
            # Within the repo's lock: a delete of what failed pulls left (store.delete_leftovers)
            # must see this manifest, or it would take the files it lists.
            store.save(manifest)
        except BaseException:
            _clean_failed(store, repo, keep_complete=network)
            raise
    return manifest


def _run_all(fn: Callable[[str], None], items: list[str]) -> None:
    """``fn`` on every item, PARALLEL_FILES at a time; the first failure cancels what has not
    started and is raised once the running ones end (nothing writes after this returns)."""
    with ThreadPoolExecutor(PARALLEL_FILES) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _clean_failed(store: ModelStore, repo: str, *, keep_complete: bool) -> None:
    try:
        removed = store.prune_repo(repo, keep_complete=keep_complete)
        if removed:
            log.info("removed %d files and folders left by the failed pull of %s", removed, repo)
    except Exception:  # noqa: BLE001 - the pull's own error is what the client must hear
        log.warning("cleaning up after the failed pull of %s failed", repo, exc_info=True)


def select_files(tree: list, repo: str = "the repository") -> list:
    """What vLLM needs of a repo's files (see the module's docstring). A listed name that is
    not a plain file name (``..``, a backslash) fails the pull: the listing is not ours."""
    for e in tree:
        if (why := path_problem(e.path)) is not None:
            raise Upstream(f"{repo} lists a file named {e.path[:100]!r} ({why}); vLLama refuses to fetch it")
    top = [e for e in tree if "/" not in e.path]
    has_safetensors = any(e.path.endswith(".safetensors") for e in top)
    # A sentence-transformers model's steps after the transformer (1_Pooling, 2_Dense, ...):
    # how its vectors are pooled, which vLLM reads to embed as the model was trained to.
    chosen = [e for e in tree if _SENTENCE_STEP.fullmatch(e.path)]
    for e in top:
        if e.path.endswith(".safetensors"):
            chosen.append(e)
        elif e.path.endswith(".bin") and not has_safetensors and not e.path.startswith("training_args"):
            chosen.append(e)
        elif e.path.endswith(_SUPPORT_SUFFIXES) or e.path in _LICENSE_NAMES:
            chosen.append(e)
    return chosen


def _is_weights(path: str) -> bool:
    return path.endswith((".safetensors", ".bin"))


def _display_digest(entry) -> str:
    """Ollama shows a sha256 per layer. LFS files (the weights) have one on the Hub; small
    files only have a git object id, so theirs is the sha256 of that id: stable, and unique."""
    if entry.lfs is not None:
        return f"sha256:{entry.lfs.sha256}"
    return f"sha256:{hashlib.sha256(f'git-blob {entry.blob_id}'.encode()).hexdigest()}"


def _verify(entry, path: Path) -> None:
    if entry.lfs is not None:
        ok = file_sha256(path) == entry.lfs.sha256
    else:
        git = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
        git.update(path.read_bytes())
        ok = git.hexdigest() == entry.blob_id
    if not ok:
        target = path.resolve()
        path.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        raise Upstream(f"digest mismatch for {entry.path}: the download was corrupted; pull again")


def _bar_for(path: str, progress: Progress) -> Callable[..., object]:
    """huggingface_hub reports bytes through a tqdm-like object it builds per download."""

    class Bar:
        def __init__(self, *_: object, initial: int = 0, **__: object) -> None:
            self.n = initial
            progress.advance(path, self.n)

        def update(self, n: int = 1) -> None:
            self.n += n
            progress.advance(path, self.n)

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *_: object) -> None:
            pass

        def __getattr__(self, _name: str) -> Callable[..., None]:
            return lambda *a, **k: None  # refresh(), set_postfix(), close(), ...

    return Bar


@contextlib.contextmanager
def _hub_errors(name: str, repo: str, revision: str) -> Iterator[None]:
    """Turn huggingface_hub's failures into errors that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except VllamaError:
        raise
    except GatedRepoError as exc:
        raise Forbidden(
            f"{repo} is gated on Hugging Face: accept its license at https://huggingface.co/{repo}, "
            "then set HF_TOKEN (a token of that account) where the pull worker runs and pull again"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFound(name, f"pull model manifest: {repo} was not found on Hugging Face; "
                                  "check the name, or set HF_TOKEN if it is a private repo") from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFound(name, f"pull model manifest: {repo} has no revision '{revision}'") from exc
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise InsufficientStorage(f"the disk filled up while pulling {name}; free some space "
                                      "(ollama rm NAME) or set VLLAMA_HOME to a bigger disk, then pull again") from exc
        if isinstance(exc, (HfHubHTTPError, LocalEntryNotFoundError, OSError)) or "httpx" in type(exc).__module__:
            endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
            raise Upstream(f"pulling {repo} from {endpoint} failed ({without_paths(str(exc))}); check the network "
                           "(or HF_ENDPOINT) and pull again: files already fetched are kept "
                           f"(ollama rm {name.removesuffix(':latest')} removes them)") from exc
        raise


# ---------------------------------------------------------------- from a GGUF file


def bundled_path(bundled: str) -> Path:
    """``package:file`` of a model file shipped inside a Python package."""
    package, filename = bundled.split(":", 1)
    # find_spec locates the package without importing it: its __init__ may need more than we
    # install (a plugin host, sentence-transformers).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(package, f"package {package} is not installed; run scripts/install.sh")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelNotFound(package, f"{filename} not found in package {package}; reinstall it")
    return path


def import_bundled(store: ModelStore, name: str, source: ModelSource, progress: Progress) -> Manifest:
    """A model shipped in a package: a GGUF file (converted) or a zipped model directory."""
    path = bundled_path(source.bundled)
    if path.suffix == ".zip":
        return import_zip(store, name, path, progress)
    return import_gguf(store, name, path, progress, source.chat_template)


def import_zip(store: ModelStore, name: str, archive: Path, progress: Progress) -> Manifest:
    """Make a model from a zip of a Hugging Face model directory, unpacked once into
    ``local/<digest>`` (importing the same file under another name reuses it)."""
    def unpack(tmp: Path) -> None:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                # Names come from a package we install, but a bad one must still not write
                # outside the directory.
                if member.is_dir():
                    continue
                if path_problem(member.filename) is not None:
                    raise ValueError(f"{archive.name}: unsafe member name {member.filename!r}")
                target = tmp / member.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)

    return _import_file(store, name, archive, progress, "", unpack)


def import_gguf(store: ModelStore, name: str, gguf: Path, progress: Progress,
                chat_template: str | None = None, *, changes: dict[str, Any] | None = None,
                made_from: str | None = None) -> Manifest:
    """Make a model from a GGUF file: converted once to safetensors (vLLM on CPU loads those)
    in ``local/<digest>``, so importing the same file under another name reuses it.
    ``chat_template`` (a file in common/chat_templates/) replaces the GGUF's template;
    ``changes`` (/api/create's system, options, ...) go into the description before the
    manifest is saved; ``made_from`` is what the manifest names as its source (default: the
    file's path)."""
    template = None
    suffix = ""
    if chat_template is not None:
        template = (TEMPLATES / chat_template).read_text(encoding="utf-8")
        suffix = f"-{hashlib.sha256(template.encode()).hexdigest()[:8]}"
    return _import_file(store, name, gguf, progress, suffix, lambda tmp: _convert_gguf(gguf, tmp, template),
                        changes=changes, made_from=made_from)


def _import_file(store: ModelStore, name: str, source: Path, progress: Progress, suffix: str,
                 make: Callable[[Path], None], *, changes: dict[str, Any] | None = None,
                 made_from: str | None = None) -> Manifest:
    """The model made from one local file by ``make`` (which fills a fresh directory), kept in
    ``local/<digest of the file><suffix>``: made once, under a lock, in a temporary directory
    renamed into place, so a crash never leaves half a model."""
    progress.phase("manifest")
    size = source.stat().st_size
    progress.add_files([PullFile(path=source.name, digest="sha256:" + "0" * 64, total=size)])
    progress.phase("verifying")
    sha = file_sha256(source)
    progress.add_files([PullFile(path=source.name, digest=f"sha256:{sha}", total=size, completed=size)])
    target = store.local / f"{sha[:16]}{suffix}"
    with store.lock(f"gguf-{target.name}"):
        if not (target / "config.json").exists():
            progress.phase("converting")
            log.info("making %s from %s in %s (once)", name, source, target)
            tmp = target.with_name(target.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            make(tmp)
            tmp.rename(target)
    progress.phase("writing")
    files = describe_files(target)
    manifest = Manifest(
        name=name, gguf=made_from or str(source), path=str(target.relative_to(store.root)), files=files,
        size=sum(f.size for f in files), digest=Manifest.digest_of(files), modified_at=clock.now(),
        description=with_changes(describe(target), changes or {}),
    )
    store.save(manifest)
    return manifest


def _convert_gguf(gguf: Path, tmp: Path, chat_template: str | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized on load; the GGUF quantization config would make
    # save_pretrained (and later vLLM) expect quantized tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if chat_template is not None:
        (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
