"""Pushing a model to a Hugging Face repo: one push job on one store that holds the model,
followed to the end, shown as Ollama's lines.

The job (workers/push.py) uploads from that store's disk, so the API never touches a file. Its
push frames carry the whole state, so a missed frame costs nothing; after a quiet spell the job's
result (kept by arq) is read in case the last frame was missed, and a push whose pull worker
was killed (its alive key lapsed) or whose store went away fails saying so. A client that goes
away does not stop the push: a half-made push changes nothing on the Hub (the commit comes
last), and a finished one is what was asked.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response
from pydantic import TypeAdapter

from api import ndjson
from api.disconnect import StreamedAnswer
from api.dispatch import Dispatcher
from api.pubsub import Overflowed, Subscription
from common import catalog, keys
from common.errors import VllamaError, from_code
from common.protocol import Frame, PushFrame, PushState

_frame = TypeAdapter(Frame)
_PHASES = ["queued", "manifest", "uploading", "committing", "success"]
QUIET_CHECK_S = 1.0


async def follow_push(d: Dispatcher, store_id: str, model: str, repo: str, revision: str
                      ) -> AsyncIterator[PushState]:
    """Start the push of ``model`` (on ``store_id``) to ``repo`` at branch ``revision``; yield
    its state whenever the job reports a change, until it has finished. The first state is the
    job's first report: by then the token, the model and the Hub's leave to create the repo are
    checked, so those failures still get their own HTTP status."""
    job_id = keys.push_job_id(store_id, secrets.token_hex(8))
    subscription = await d.mux.subscribe(keys.frames_channel(job_id))  # before enqueue
    try:
        await d.queue.enqueue_store_job(store_id, "push", model, repo, revision, job_id=job_id)
        state = PushState(model=model, store_id=store_id, repo=repo, revision=revision)
        while not state.finished:
            latest = await _next_state(subscription, QUIET_CHECK_S) or await _recheck(d, job_id, state)
            if latest is not None and latest != state:
                state = latest
                yield state
    finally:
        await d.mux.unsubscribe(subscription)


async def _next_state(subscription: Subscription, timeout: float) -> PushState | None:
    """The newest state among the frames that arrive within ``timeout`` (and any already there)."""
    try:
        raw = await subscription.get(timeout)
        if raw is None:
            return None
        raws = [raw, *subscription.take_all()]
    except Overflowed:  # fell behind: the re-check reads the result, or the next frame comes
        return None
    frames = [f for f in (_frame.validate_json(r) for r in raws) if isinstance(f, PushFrame)]
    return frames[-1].state if frames else None


async def _recheck(d: Dispatcher, job_id: str, state: PushState) -> PushState | None:
    """After a quiet spell: the job's result if it has ended (its last frame missed), or a
    failure if its store or its worker is gone; None while it is queued or running."""
    info = await d.queue.store_job_result(state.store_id, job_id)
    if info is not None:
        if info.success and isinstance(info.result, dict):
            return PushState.model_validate(info.result)
        return _failed(state, "internal", f"the push failed: {info.result}; push again")
    if state.store_id not in {s.store_id for s in await catalog.live_stores(d.redis)}:
        return _failed(state, "unavailable", f"the pull worker of store {state.store_id} stopped; start it "
                                             "(`vllama pull-worker`) and push again")
    if await d.queue.store_job_orphaned(job_id, keys.push_alive(job_id)):
        return _failed(state, "unavailable", f"the pull worker of store {state.store_id} stopped during the "
                                             "push; push again")
    return None


def _failed(state: PushState, code: str, message: str) -> PushState:
    return state.model_copy(update={"status": "failed", "code": code, "error": message})


class PushLines:
    """Turns a push's states into Ollama's lines, each said once: "retrieving manifest", a
    "pushing <digest>" line per file whenever its bytes move (a 0 first, completed == total
    last), "pushing manifest", "success"; or, once the push failed, ``error``."""

    def __init__(self) -> None:
        self._said: set[str] = set()
        self._completed: dict[str, int] = {}
        self.error: VllamaError | None = None

    def lines(self, state: PushState) -> list[dict[str, Any]]:
        if state.status == "failed":
            self.error = from_code(state.code or "internal", state.error or "the push failed")
            return []
        out = self._once("retrieving manifest")
        for f in state.files:
            if self._completed.get(f.digest) != f.completed:
                if f.digest not in self._completed and f.completed:
                    out.append(self._file(f.digest, f.total, 0))  # every file's first line says 0
                self._completed[f.digest] = f.completed
                out.append(self._file(f.digest, f.total, f.completed))
        phase = _PHASES.index(state.status)
        if phase >= _PHASES.index("committing"):
            out += self._once("pushing manifest")
        if state.status == "success":
            out += self._once("success")
        return out

    @staticmethod
    def _file(digest: str, total: int, completed: int) -> dict[str, Any]:
        return {"status": f"pushing {digest[7:19]}", "digest": digest, "total": total, "completed": completed}

    def _once(self, status: str) -> list[dict[str, Any]]:
        if status in self._said:
            return []
        self._said.add(status)
        return [{"status": status}]


async def push_response(d: Dispatcher, store_id: str, model: str, repo: str, revision: str,
                        stream: bool) -> Response:
    """Ollama's progress lines, or one object at the end with ``stream`` false. A failure
    before the job's first report (no token, the Hub refusing to make the repo) gets its own
    status either way; one after it, an in-band {"error": ...} line."""
    states = follow_push(d, store_id, model, repo, revision)
    lines = PushLines()
    try:
        first = lines.lines(await anext(states))
        if lines.error:
            raise lines.error
        if not stream:
            async for state in states:
                lines.lines(state)
                if lines.error:
                    raise lines.error
            return JSONResponse({"status": "success"})
    except BaseException:
        await states.aclose()
        raise
    return StreamedAnswer(ndjson.relay_progress(lines, states, "push again", first), media_type=ndjson.NDJSON)
