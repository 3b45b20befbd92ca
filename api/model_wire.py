"""Ollama's model-management bodies (exact field names) and responses."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import model_validator

from api.bounds import WireModel

from common.catalog import CatalogEntry, Manifest
from common.errors import BadRequest
from common.model_info import modelfile
from common.models import canonical_name
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


class ShowRequest(_Named):
    verbose: bool = False


class DeleteRequest(_Named):
    pass


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


def show_body(manifest: Manifest) -> dict[str, Any]:
    d = manifest.description
    return {
        "modelfile": modelfile(manifest.name, d),
        "parameters": d.parameters,
        "template": d.template,
        "license": d.license,
        "details": details(manifest),
        "model_info": d.model_info,
        "capabilities": d.capabilities,
        "modified_at": rfc3339(manifest.modified_at),
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
