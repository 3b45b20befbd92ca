"""Records that cross processes, typed: what the API and the workers write to Redis about a
job (``vllama:job:<id>``), a model load (``vllama:load:<model>``) and an OpenAI batch
(``vllama:batch:<id>``, ``vllama:batch-lines:<id>``). Pull states are common/protocol.py's
PullState, line outcomes common/batch_lines.py's LineOutcome.

Like the frames and job specs of common/protocol.py they are JSON that `redis-cli` shows as
text, and every reader validates them here instead of reading a dict with defaults.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from common import clock
from common.protocol import GenerationJob, JobRoute

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED: tuple[JobStatus, ...] = ("done", "failed", "cancelled")


class JobRecord(BaseModel):
    """Where a job is and how it ended. Written by the API (queued, cancelled before it
    started, lost with its worker or with Redis) and by the worker (running, done, failed,
    cancelled); the latest write wins."""

    model_config = ConfigDict(populate_by_name=True)

    job_id: str
    model: str
    kind: Literal["generate", "chat", "embed", "pull"]
    priority: Literal["interactive", "batch"] = "interactive"
    is_async: bool = Field(default=False, alias="async")
    status: JobStatus
    created_at: float
    updated_at: float = Field(default_factory=clock.now)
    started_at: float | None = None
    worker_id: str | None = None
    error: str | None = None
    stores: list[str] = Field(default_factory=list)  # a pull job: the stores it pulls into
    owner: str | None = None  # the API key's name that made it; None: made before keys, or without them
    route: JobRoute | None = None  # the worker the API routed it to, and why (api/routing.py)

    @classmethod
    def of(cls, job: GenerationJob, status: JobStatus, **fields: object) -> JobRecord:
        return cls(job_id=job.job_id, model=job.model, kind=job.kind, priority=job.priority,
                   is_async=not job.stream, status=status, created_at=job.created_at, owner=job.owner,
                   route=job.route, **fields)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def ended(self, status: JobStatus, error: str | None = None) -> JobRecord:
        """This record as it reads once the job ended without its worker saying so."""
        return self.model_copy(update={"status": status, "error": error, "updated_at": clock.now()})

    def dump(self) -> str:
        return self.model_dump_json(by_alias=True)


class LoadRecord(BaseModel):
    """The latest attempt to load a model: which worker, how it went (tells requests waiting
    for the model why it will not come)."""

    model: str
    status: Literal["loading", "ready", "failed"]
    worker_id: str
    at: float = Field(default_factory=clock.now)
    code: str | None = None
    error: str | None = None
    load_s: float | None = None


BatchStatus = Literal["in_progress", "cancelling", "finalizing", "completed", "failed", "expired", "cancelled"]


class BatchRecord(BaseModel):
    """An OpenAI batch as the API keeps it (``vllama:batch:<id>``): OpenAI's batch object,
    without its live request_counts, plus what only we need (``total``, ``expiring``)."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: dict[str, Any] | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus = "in_progress"
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    metadata: dict[str, str] | None = None
    total: int = 0  # lines in the input file
    expiring: bool = False  # cancelling because its window ended, not because it was asked to
    owner: str | None = None  # the API key's name that made it (api/ownership.py); not shown

    @property
    def open(self) -> bool:
        """Lines may still be running."""
        return self.status in ("in_progress", "cancelling")

    def shown(self, completed: int, failed: int) -> dict[str, Any]:
        """OpenAI's batch object, with the counts as of now."""
        body = self.model_dump(exclude={"total", "expiring", "owner"})
        body["request_counts"] = {"total": self.total, "completed": completed, "failed": failed}
        return body


class BatchLine(BaseModel):
    """One input line of a batch: its custom_id, and the job that runs it (None: it could
    not run, and its error outcome was recorded when the batch was created)."""

    custom_id: str
    shown_model: str | None = None  # the model as the line named it, for its output line
    model: str | None = None
    job_id: str | None = None
    base64: bool = False  # an embeddings line asking for encoding_format "base64"


BATCH_LINES = TypeAdapter(list[BatchLine])
