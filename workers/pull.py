"""Getting a model into a store: pulled from the Hugging Face Hub, or made from a GGUF file.

Both run in a thread (huggingface_hub and transformers block) and report through a
``Progress``, which the pull worker turns into pull frames. Only what vLLM needs is fetched:
the repo's top-level safetensors weights (or .bin weights when there are none), configs,
tokenizer files, chat templates and the license; not the ``original/`` checkpoints or GGUF,
ONNX and other copies that many repos also carry.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import clock
from common.catalog import CatalogEntry, Manifest, ManifestFile
from common.errors import Forbidden, InsufficientStorage, ModelNotFound, Upstream, VllamaError
from common.model_info import describe
from common.models import source_for
from common.protocol import PullFile, PullState, PullStatus
from common.redact import without_paths
from workers.store import ModelStore, describe_files, file_sha256

TEMPLATES = Path(__file__).resolve().parent.parent / "common" / "chat_templates"

log = logging.getLogger(__name__)

PARALLEL_FILES = 4
_SUPPORT_SUFFIXES = (".json", ".model", ".tiktoken", ".txt", ".jinja")
_LICENSE_NAMES = {"LICENSE", "LICENSE.md", "LICENSE.txt"}


class Progress:
    """A pull's state, updated from download threads; ``notify`` is called after each change
    and must be thread-safe (the pull worker hands it to its event loop)."""

    def __init__(self, state: PullState, notify: Callable[[], None] = lambda: None) -> None:
        self.state = state
        self._notify = notify
        self._lock = threading.Lock()

    def phase(self, status: PullStatus) -> None:
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

    def snapshot(self) -> PullState:
        with self._lock:
            return self.state.model_copy(deep=True)


def pull(store: ModelStore, name: str, progress: Progress, entry: CatalogEntry | None = None) -> Manifest:
    """Pull ``name`` into ``store``: the bundled model is imported from its package; a model
    the cluster already has (``entry``, from the Redis catalog) comes from where it came from
    (its Hub repo), or, made from a GGUF file on another machine, from a store holding it;
    anything else (an alias or a repo id) from the Hub."""
    source = source_for(name)
    if source is not None and source.bundled_gguf:
        return import_gguf(store, name, bundled_gguf_path(source.bundled_gguf), progress, source.chat_template)
    if entry is not None and not entry.manifest.repo:
        from workers.peer_fetch import fetch_from_peers

        return fetch_from_peers(store, name, entry, progress)
    if source is None and entry is not None and entry.manifest.repo:  # a copy of a pulled model
        return pull_from_hub(store, name, entry.manifest.repo, entry.manifest.commit or "main", progress)
    if source is None:
        raise ModelNotFound(name, f"pull model manifest: '{name}' is not a model vLLama knows; use a "
                                  "Hugging Face repo id (org/name) or a name from `vllama suggest --all`")
    return pull_from_hub(store, name, source.hf_repo, source.revision, progress)


def ensure_local(store: ModelStore, name: str, entry: CatalogEntry | None) -> Path:
    """The directory to load ``name`` from, fetching it first when this machine lacks it
    but another store has it (``entry``, from the Redis catalog) or it is bundled. A model
    with a Hub repo is fetched from the Hub (whose hashes vouch for it); one made from a GGUF
    file elsewhere, from a store holding it (workers/peer_fetch.py)."""
    manifest = store.get(name)
    if manifest is None:
        silent = Progress(PullState(model=name, store_id="local"))
        source = source_for(name)
        if source is not None and source.bundled_gguf:
            manifest = import_gguf(store, name, bundled_gguf_path(source.bundled_gguf), silent, source.chat_template)
        elif entry is not None and entry.manifest.repo:
            log.info("%s is not on this machine yet; fetching %s", name, entry.manifest.repo)
            manifest = pull_from_hub(store, name, entry.manifest.repo, entry.manifest.commit or "main", silent)
        elif entry is not None:
            from workers.peer_fetch import fetch_from_peers

            log.info("%s is not on this machine yet; fetching it from store(s) %s", name, ", ".join(entry.stores))
            manifest = fetch_from_peers(store, name, entry, silent)
        else:
            raise ModelNotFound(name)
    return store.model_dir(manifest)


# ---------------------------------------------------------------- from the Hub


def pull_from_hub(store: ModelStore, name: str, repo: str, revision: str, progress: Progress) -> Manifest:
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: tests and operators set it late
    api = HfApi(endpoint=endpoint)
    progress.phase("manifest")
    with _hub_errors(name, repo, revision):
        commit = api.model_info(repo, revision=revision).sha
        tree = [e for e in api.list_repo_tree(repo, revision=commit, recursive=True) if hasattr(e, "blob_id")]
    wanted = select_files(tree)
    if not any(_is_weights(e.path) for e in wanted):
        raise ModelNotFound(name, f"{repo} has no safetensors (or .bin) weights at its top level; "
                                  "vLLama cannot serve it")
    files = [PullFile(path=e.path, digest=_display_digest(e), total=e.size) for e in wanted]
    cached = {e.path for e in wanted if isinstance(try_to_load_from_cache(repo, e.path, store.hub, commit), str)}
    for f in files:
        if f.path in cached:
            f.completed = f.total
    progress.add_files(files)
    check_space(store, name, sum(e.size for e in wanted if e.path not in cached))

    paths: dict[str, Path] = {}
    with store.lock(f"repo-{repo}"), _hub_errors(name, repo, revision):
        progress.phase("downloading")

        def fetch(path: str) -> None:
            paths[path] = Path(hf_hub_download(
                repo, path, revision=commit, cache_dir=store.hub, endpoint=endpoint,
                tqdm_class=_bar_for(path, progress),
            ))
            progress.advance(path, 1 << 62)

        with ThreadPoolExecutor(PARALLEL_FILES) as pool:
            for future in [pool.submit(fetch, e.path) for e in wanted]:
                future.result()

        progress.phase("verifying")
        for entry in wanted:
            if entry.path not in cached:
                _verify(entry, paths[entry.path])

    progress.phase("writing")
    model_dir = next(iter(paths.values())).parent
    manifest_files = [ManifestFile(path=f.path, size=f.total, digest=f.digest) for f in files]
    manifest = Manifest(
        name=name, repo=repo, commit=commit, path=str(model_dir.relative_to(store.root)),
        files=manifest_files, size=sum(f.size for f in manifest_files),
        digest=Manifest.digest_of(manifest_files), modified_at=clock.now(), description=describe(model_dir),
    )
    store.save(manifest)
    return manifest


def select_files(tree: list) -> list:
    top = [e for e in tree if "/" not in e.path]
    has_safetensors = any(e.path.endswith(".safetensors") for e in top)
    chosen = []
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


def check_space(store: ModelStore, name: str, needed: int) -> None:
    free = store.free_bytes()
    if needed > free:
        raise InsufficientStorage(
            f"not enough disk space to pull {name}: it needs {needed / 1e9:.1f} GB more and "
            f"{free / 1e9:.1f} GB are free in {store.root}; delete models you no longer need "
            "(ollama rm NAME) or set VLLAMA_HOME to a bigger disk"
        )


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
                           "(or HF_ENDPOINT) and pull again: files already fetched are kept") from exc
        raise


# ---------------------------------------------------------------- from a GGUF file


def bundled_gguf_path(bundled: str) -> Path:
    """``package:file`` of a GGUF shipped inside a Python package."""
    package, filename = bundled.split(":", 1)
    # find_spec locates the package without importing it: its __init__ needs a plugin host.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(package, f"package {package} is not installed; run scripts/install.sh")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelNotFound(package, f"{filename} not found in package {package}; reinstall it")
    return path


def import_gguf(store: ModelStore, name: str, gguf: Path, progress: Progress,
                chat_template: str | None = None) -> Manifest:
    """Make a model from a GGUF file: converted once to safetensors (vLLM on CPU loads those)
    in ``local/<digest>``, so importing the same file under another name reuses it.
    ``chat_template`` (a file in common/chat_templates/) replaces the GGUF's template."""
    progress.phase("manifest")
    size = gguf.stat().st_size
    progress.add_files([PullFile(path=gguf.name, digest="sha256:" + "0" * 64, total=size)])
    progress.phase("verifying")
    sha = file_sha256(gguf)
    progress.add_files([PullFile(path=gguf.name, digest=f"sha256:{sha}", total=size, completed=size)])
    template = None
    target = store.local / sha[:16]
    if chat_template is not None:
        template = (TEMPLATES / chat_template).read_text(encoding="utf-8")
        target = target.with_name(f"{target.name}-{hashlib.sha256(template.encode()).hexdigest()[:8]}")
    with store.lock(f"gguf-{target.name}"):
        if not (target / "config.json").exists():
            progress.phase("converting")
            _convert_gguf(gguf, target, template)
    progress.phase("writing")
    files = describe_files(target)
    manifest = Manifest(
        name=name, gguf=str(gguf), path=str(target.relative_to(store.root)), files=files,
        size=sum(f.size for f in files), digest=Manifest.digest_of(files), modified_at=clock.now(),
        description=describe(target),
    )
    store.save(manifest)
    return manifest


def _convert_gguf(gguf: Path, target: Path, chat_template: str | None) -> None:
    """Into a temporary directory renamed into place: a crash never leaves a half model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf, target)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
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
    tmp.rename(target)
