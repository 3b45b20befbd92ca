"""Ollama's model-management bodies (exact field names) and responses."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import Field, model_validator

from api.bounds import JsonObject, WireModel
from api.ollama_models import Options

from common.blob_catalog import parse_digest
from common.catalog import CatalogEntry, Manifest
from common.errors import BadRequest
from common.model_defaults import OPTION_FIELDS
from common.model_info import modelfile
from common.models import DEFAULT_REVISION, DEFAULT_TAG, canonical_name, is_repo_id
from common.ollama_templates import checked_template
from common.registry import ModelStatus, WorkerInfo

# Ollama shows keep_alive < 0 as an expiry ~292 years away (Go's longest duration).
_FOREVER = timedelta(days=292 * 365)


class _Named(WireModel):
    """``model``, or the deprecated ``name``."""

    model: str = ""
    name: str = ""

    @model_validator(mode="after")
    def _alias(self) -> _Named:
        self.model = self.model or self.name
        return self

    def canonical(self) -> str:
        if not self.model.strip():
            raise BadRequest("model is required")
        return canonical_name(self.model)


class PullRequest(_Named):
    insecure: bool = False
    stream: bool = True


class PushRequest(_Named):
    """/api/push. ``insecure`` is accepted and ignored (the Hub, or HF_ENDPOINT, decides)."""

    insecure: bool = False
    stream: bool = True

    def target(self) -> tuple[str, str, str]:
        """(model, repo, branch): the model to push and where it goes. ``org/name`` and
        ``org/name:latest`` go to the repo's main branch; ``org/name:tag`` (or ``org/name@tag``)
        to the branch named after the tag, which ``ollama pull org/name@tag`` fetches back. A
        name without an org has no repo to go to."""
        model = self.canonical()
        if is_repo_id(model):
            repo, _, revision = model.partition("@")
            return model, repo, revision or DEFAULT_REVISION
        base, _, tag = model.partition(":")
        if "/" in base:
            return model, base, DEFAULT_REVISION if tag == DEFAULT_TAG else tag
        shown = model.removesuffix(f":{DEFAULT_TAG}")
        raise BadRequest(f'"{shown}" cannot be pushed: push to a Hugging Face repository named like '
                         f'"you/{base}"; copy it first with ollama cp {shown} you/{base}')


class ShowRequest(_Named):
    verbose: bool = False


class DeleteRequest(_Named):
    pass


class CreateRequest(_Named):
    """/api/create. Made from an existing model (``from``), or from uploaded files (``files``,
    api/blob_routes.py); what it changes goes into the new model's description
    (workers/store.py's create and with_changes)."""

    from_: str | None = Field(default=None, alias="from")
    system: str | None = None
    parameters: JsonObject | None = None
    messages: list[JsonObject] | None = None
    license: str | list[str] | None = None
    template: str | None = None
    files: JsonObject | None = None
    adapters: JsonObject | None = None
    quantize: str | None = None
    stream: bool = True

    def names(self) -> tuple[str, str]:
        """(source, destination)."""
        if self.adapters:
            raise _adapters_refused()
        if not self.from_:
            raise BadRequest('"from" is required: the existing model the new one is made from')
        if self.quantize:
            raise BadRequest("quantize is not supported: the new model keeps its source's weights")
        try:
            return canonical_name(self.from_), canonical_name(self.model)
        except BadRequest:
            raise BadRequest(f'model name "{self.model}" or "from" "{self.from_}" is invalid') from None

    def uploaded_files(self) -> tuple[str, dict[str, str]]:
        """(destination, file name -> sha256 hex) of a create from uploaded files (``files``)."""
        if self.adapters:
            raise _adapters_refused()
        if self.quantize:
            raise BadRequest("quantize is not supported: upload a model already quantized (a quantized .gguf "
                             "file, or safetensors weights quantized for vLLM) and leave quantize out")
        if self.from_:
            raise BadRequest('send either "from" (an existing model) or "files" (uploaded files), not both')
        if not self.model.strip():
            raise BadRequest("model is required")
        files = {}
        for path, digest in (self.files or {}).items():
            if not isinstance(digest, str):
                raise BadRequest(f'files["{path[:100]}"] must be a digest string, "sha256:<64 hex digits>"')
            files[path] = parse_digest(digest)
        try:
            return canonical_name(self.model), files
        except BadRequest:
            raise BadRequest(f'model name "{self.model}" is invalid') from None

    def changes(self) -> dict[str, Any]:
        """What the new model changes in its source's description."""
        changes: dict[str, Any] = {}
        if self.system is not None:
            changes["system"] = self.system
        if self.parameters:
            options = {k: v for k, v in self.parameters.items() if k in OPTION_FIELDS}
            Options.model_validate(options).to_sampling(None)  # a bad value is this request's 400
            changes["options"] = options
        if self.messages is not None:
            for i, message in enumerate(self.messages):
                if message.get("role") not in ("system", "user", "assistant") or \
                        not isinstance(message.get("content"), str):
                    raise BadRequest(f'messages[{i}] must be {{"role": "system", "user" or "assistant", '
                                     '"content": "..."}')
            changes["messages"] = [{"role": m["role"], "content": m["content"]} for m in self.messages]
        if self.template is not None:  # an Ollama (Go) template, checked now: its error is this request's 400
            changes["prompt_template"] = checked_template(self.template) if self.template.strip() else ""
        if self.license is not None:
            changes["license"] = self.license if isinstance(self.license, str) else "\n\n".join(self.license)
        return changes


def _adapters_refused() -> BadRequest:
    return BadRequest("adapters are not supported: merge the adapter into the model's weights (for example with "
                      "peft's merge_and_unload), then create the model from those files, without adapters")


class CopyRequest(WireModel):
    source: str = ""
    destination: str = ""

    def names(self) -> tuple[str, str]:
        names = []
        for field in ("source", "destination"):
            value = getattr(self, field)
            try:
                names.append(canonical_name(value))
            except BadRequest:
                raise BadRequest(f'{field} "{value}" is invalid') from None
        return names[0], names[1]


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def details(manifest: Manifest) -> dict[str, Any]:
    return manifest.description.details.model_dump()


def tag_entry(entry: CatalogEntry) -> dict[str, Any]:
    m = entry.manifest
    return {
        "name": m.name, "model": m.name, "modified_at": rfc3339(m.modified_at), "size": m.size,
        "digest": m.digest, "details": details(m),
        "capabilities": m.description.capabilities,
        "stores": entry.stores,
    }


def show_body(manifest: Manifest, tensors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """/api/show's body; ``tensors`` (read from a store's disk) only when asked (verbose)."""
    d = manifest.description
    return {
        "modelfile": modelfile(manifest.name, d),
        "parameters": d.parameters,
        "template": d.prompt_template or d.template,
        "license": d.license,
        "details": details(manifest),
        "model_info": d.model_info,
        "capabilities": d.capabilities,
        "modified_at": rfc3339(manifest.modified_at),
        # Ollama's omitempty fields: a created model's, a vision model's, verbose's.
        **({"system": d.system} if d.system else {}),
        **({"messages": d.messages} if d.messages else {}),
        **({"projector_info": d.projector_info} if d.projector_info else {}),
        **({"tensors": tensors} if tensors is not None else {}),
    }


def _expiry(now: datetime, expiries: list[float | None]) -> datetime:
    """The latest expiry; None (kept forever) and anything past Ollama's "forever" show as it.
    Clamped rather than trusted: a worker may still hold an expiry from before keep_alive
    was bounded (1e300, inf or nan), and one such value must not fail /api/ps for everyone."""
    forever = now + _FOREVER
    if None in expiries or any(math.isnan(e) for e in expiries):
        return forever
    latest = max(expiries)
    if latest >= forever.timestamp():
        return forever
    return datetime.fromtimestamp(max(latest, 0.0), UTC)


def ps_entries(workers: list[WorkerInfo], catalog: dict[str, CatalogEntry]) -> list[dict[str, Any]]:
    """One entry per model held by some live worker, longest time left first."""
    held: dict[str, list[tuple[WorkerInfo, ModelStatus]]] = {}
    for worker in workers:
        for status in worker.loaded:
            if status.state != "unloading":
                held.setdefault(status.name, []).append((worker, status))
    entries = []
    now = datetime.now(UTC)
    for name, holders in held.items():
        statuses = [s for _, s in holders]
        expires = _expiry(now, [s.expires_at for s in statuses])
        entry = catalog.get(name)
        size = entry.manifest.size if entry is not None else max(s.size for s in statuses)
        entries.append((expires, {
            "name": name, "model": name, "size": size,
            "digest": entry.manifest.digest if entry is not None else "",
            "details": details(entry.manifest) if entry is not None else {},
            "expires_at": expires.isoformat().replace("+00:00", "Z"),
            "size_vram": sum(s.size_vram for s in statuses),
            "context_length": max(s.context_length for s in statuses),
            # Beyond Ollama: where the model runs, for operators.
            "workers": [{"worker_id": w.worker_id, "host": w.host, "state": s.state, "running": s.running}
                        for w, s in holders],
        }))
    entries.sort(key=lambda e: e[0], reverse=True)
    return [body for _, body in entries]
