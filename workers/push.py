"""Pushing a model to a Hugging Face repository (/api/push), as a store job.

The pull worker of a store holding the model runs it: the model's files, as its manifest
lists them, go up with ``huggingface_hub`` in one commit (the repo is created if it is not
there), with the token in HF_TOKEN of the pull worker's environment. Nothing else is uploaded
and nothing is rewritten: the repo holds the same config, weights and tokenizer files the
store loads, so it is a Hugging Face model any tool loads, and pulling it back gives the same
bytes. What /api/create added to a model (system prompt, messages, default options, license)
lives only in vLLama's manifest and is not carried.

The upload runs in a thread (huggingface_hub blocks) and reports through a ``PushProgress``;
``PushJob`` publishes it as push frames, each carrying the whole state, as pulls do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from arq.connections import ArqRedis

from common import clock, keys
from common.errors import ErrorCode, Forbidden, ModelNotFound, Upstream, VllamaError
from common.protocol import PullFile, PushFrame, PushState
from common.redact import without_paths
from common.settings import Settings
from workers.frames import FramePublisher, FrameSink
from workers.pull import Progress, check_model_dir
from workers.store import ModelStore, file_sha256

log = logging.getLogger(__name__)

PUBLISH_EVERY_S = 0.1

NO_TOKEN = ("pushing needs a Hugging Face token with write access: set HF_TOKEN (a write token of the account "
            "or organization that owns {repo}) in the environment of the pull workers (`vllama pull-worker`, "
            "or `vllama serve`), restart them and push again")


class PushProgress(Progress[PushState]):
    """A push's state, updated from the upload thread (as a pull's is, workers/pull.py)."""

    def all_sent(self) -> None:
        """Every file is on the Hub or in the commit about to be sent."""
        with self._lock:
            for f in self.state.files:
                f.completed = f.total
        self._notify()

    def end(self, commit: str | None = None, code: str | None = None, error: str | None = None) -> PushState:
        with self._lock:
            self.state.status = "failed" if error else "success"
            self.state.commit, self.state.code, self.state.error = commit, code, error
            self.state.updated_at = clock.now()
            return self.state.model_copy(deep=True)


def push_model(store: ModelStore, name: str, repo: str, revision: str, progress: PushProgress) -> str:
    """Upload ``name``'s files to ``repo`` at branch ``revision`` in one commit; returns the
    commit. The repo (and the branch) are made first, so a token that may not write there
    fails before anything is read or sent."""
    from huggingface_hub import HfApi

    token = os.environ.get("HF_TOKEN") or None
    if token is None:
        raise Forbidden(NO_TOKEN.format(repo=repo))
    manifest = store.get(name)
    shown = name.removesuffix(":latest")
    if manifest is None:
        raise ModelNotFound(name, f"model '{shown}' not found")
    model_dir = store.model_dir(manifest)
    # A file leading out of the store would be uploaded for anyone to read: refuse it.
    check_model_dir(store, manifest.name, model_dir, {f.path for f in manifest.files})
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: tests and operators set it late
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(shown, repo, revision):
        api.create_repo(repo, exist_ok=True)
        if revision != "main":
            api.create_branch(repo, branch=revision, exist_ok=True)

    progress.phase("manifest")
    files = [PullFile(path=f.path, digest=f"sha256:{file_sha256(model_dir / f.path)}", total=f.size)
             for f in manifest.files]
    progress.add_files(files)
    progress.phase("uploading")
    operations = [_reported(model_dir, f, progress) for f in files]
    with _hub_errors(shown, repo, revision):
        # The weights first (LFS, or Xet where hf_xet is installed), each with byte progress
        # on LFS; then the one commit that carries the small files and makes them all the repo's.
        api.preupload_lfs_files(repo, additions=operations, revision=revision)
        progress.all_sent()
        progress.phase("committing")
        info = api.create_commit(repo, operations, revision=revision, commit_message=f"Push {shown} from vLLama",
                                 commit_description=f"The files of {shown} ({manifest.digest[:12]}).")
    return info.oid


def _reported(model_dir: Path, file: PullFile, progress: PushProgress) -> Any:
    """The file as a commit operation that reports the bytes sent while huggingface_hub
    uploads it over LFS (it reads the file through ``as_file(with_tqdm=True)`` for that), its
    sha256 already known so that it is not read twice."""
    from huggingface_hub import CommitOperationAdd

    class Reported(CommitOperationAdd):
        @contextlib.contextmanager
        def as_file(self, with_tqdm: bool = False) -> Iterator[BinaryIO]:
            if not with_tqdm or not isinstance(self.path_or_fileobj, str):
                with super().as_file() as plain:
                    yield plain
                return
            with open(self.path_or_fileobj, "rb") as fh:
                read = fh.read

                def counted(size: int | None = -1) -> bytes:
                    data = read(size)
                    progress.advance(file.path, fh.tell())  # tell: a retried upload rewinds
                    return data

                fh.read = counted  # type: ignore[method-assign]
                yield fh

    operation = Reported(path_in_repo=file.path, path_or_fileobj=str(model_dir / file.path))
    operation.upload_info.sha256 = bytes.fromhex(file.digest.removeprefix("sha256:"))
    return operation


@contextlib.contextmanager
def _hub_errors(model: str, repo: str, revision: str) -> Iterator[None]:
    """Turn huggingface_hub's failures into errors that say what to do."""
    from huggingface_hub.errors import HfHubHTTPError

    namespace = repo.split("/")[0]
    try:
        yield
    except VllamaError:
        raise
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        said = (exc.server_message or str(exc)).strip().rstrip(".")
        if status in (401, 403):
            raise Forbidden(
                f"Hugging Face refused the push to {repo}: {said}. HF_TOKEN of the pull workers must be a token "
                f"with write access to {namespace} (a fine-grained token needs write access to that repo or "
                f"namespace); or push to a repository of your own: ollama cp {model} you/{repo.split('/')[1]}"
            ) from exc
        raise Upstream(f"pushing {model} to {repo} (branch {revision}) failed: {without_paths(said)}; "
                       "push again") from exc
    except Exception as exc:
        if isinstance(exc, OSError) or "httpx" in type(exc).__module__:
            endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
            raise Upstream(f"pushing {model} to {endpoint} failed ({without_paths(str(exc))}); check the network "
                           "(or HF_ENDPOINT) and push again") from exc
        raise


class PushJob:
    """One push as the pull worker runs it: the upload in a thread, its state published when
    it changes (at most every PUBLISH_EVERY_S) and at the end, an alive key renewed every
    heartbeat so that the API notices a killed worker."""

    def __init__(self, redis: ArqRedis, sink: FrameSink, settings: Settings, store_id: str, job_id: str,
                 model: str, repo: str, revision: str) -> None:
        self.redis, self.settings = redis, settings
        self.publisher = FramePublisher(sink, job_id)
        self.alive = keys.push_alive(job_id)
        self.state = PushState(model=model, store_id=store_id, repo=repo, revision=revision)

    async def run(self, start: Callable[[PushProgress], asyncio.Future]) -> dict[str, Any]:
        """``start(progress)`` starts the upload (push_model) in a thread. Returns the final
        state, which arq keeps as the job's result for an API that missed the last frame."""
        changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        progress = PushProgress(self.state, notify=lambda: loop.call_soon_threadsafe(changed.set))
        name = self.state.model
        try:
            await self._still_alive()
            commit = await self._follow(start(progress), progress, changed)
            final = progress.end(commit=commit)
            log.info("pushed %s to %s@%s (commit %s)", name, self.state.repo, self.state.revision, commit)
        except asyncio.CancelledError:
            final = progress.end(code=ErrorCode.UNAVAILABLE,
                                 error="the pull worker stopped during the push; push again")
            await asyncio.shield(self._publish(final))
            raise
        except VllamaError as exc:
            final = progress.end(code=exc.code, error=exc.message)
            log.warning("push %s failed: %s", name, exc.message)
        except Exception as exc:  # noqa: BLE001 - the client must hear about any failure
            log.exception("push %s failed", name)
            final = progress.end(code=ErrorCode.INTERNAL, error=f"push failed: {without_paths(str(exc))}")
        finally:
            await asyncio.shield(self.redis.delete(self.alive))
        await self._publish(final)
        return final.model_dump(mode="json")

    async def _follow(self, work: asyncio.Future, progress: PushProgress, changed: asyncio.Event) -> str:
        while True:
            waiter = asyncio.ensure_future(changed.wait())
            await asyncio.wait({work, waiter}, timeout=self.settings.heartbeat_interval_s,
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            await self._still_alive()
            if work.done():
                return work.result()
            if changed.is_set():
                changed.clear()
                await self._publish(progress.snapshot())
                await asyncio.sleep(PUBLISH_EVERY_S)

    async def _still_alive(self) -> None:
        await self.redis.set(self.alive, self.state.store_id, px=int(self.settings.heartbeat_ttl_s * 1000))

    async def _publish(self, state: PushState) -> None:
        await self.publisher.send(PushFrame, state=state)
