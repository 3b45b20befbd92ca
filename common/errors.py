"""One error hierarchy for the whole project.

Each error has a stable ``code`` (also used in error frames, so a worker's error keeps its
meaning when the API re-raises it) and an HTTP status. The message tells the user what to do.
The API maps these to Ollama's ``{"error": "..."}`` body in one place (api/errors.py).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    MODEL_NOT_FOUND = "model_not_found"
    NOT_FOUND = "not_found"  # something else asked for by id: a job
    CONFLICT = "conflict"  # e.g. cancelling a job that has ended
    PROMPT_TOO_LONG = "prompt_too_long"
    SERVER_BUSY = "server_busy"
    WORKER_LOST = "worker_lost"
    STREAM_BROKEN = "stream_broken"
    CANCELLED = "cancelled"
    UNAVAILABLE = "unavailable"
    FORBIDDEN = "forbidden"  # e.g. a gated model and no Hugging Face token
    INSUFFICIENT_STORAGE = "insufficient_storage"
    TOO_LARGE = "too_large"  # a request past one of the VLLAMA_MAX_* limits
    UPSTREAM = "upstream"  # the model hub failed or cannot be reached
    INTERNAL = "internal"


_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.PROMPT_TOO_LONG: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.CANCELLED: 499,
    ErrorCode.SERVER_BUSY: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.INSUFFICIENT_STORAGE: 507,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UPSTREAM: 502,
    ErrorCode.WORKER_LOST: 500,
    ErrorCode.STREAM_BROKEN: 500,
    ErrorCode.INTERNAL: 500,
}

# Ollama's exact text (two spaces before "maximum"); clients match on it.
SERVER_BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"


class VllamaError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return _STATUS[self.code]


class BadRequest(VllamaError):
    code = ErrorCode.BAD_REQUEST


class PromptTooLong(VllamaError):
    code = ErrorCode.PROMPT_TOO_LONG


class ModelNotFound(VllamaError):
    code = ErrorCode.MODEL_NOT_FOUND

    def __init__(self, model: str, message: str | None = None) -> None:
        shown = model.removesuffix(":latest")  # as the user typed it, usually
        super().__init__(message or f"model '{shown}' not found, try pulling it first: ollama pull {shown}")
        self.model = model


class TooLarge(VllamaError):
    """A request past one of the configured limits; the message names the setting to raise."""

    code = ErrorCode.TOO_LARGE


class NotFound(VllamaError):
    code = ErrorCode.NOT_FOUND


class Conflict(VllamaError):
    code = ErrorCode.CONFLICT


class ServerBusy(VllamaError):
    code = ErrorCode.SERVER_BUSY

    def __init__(self) -> None:
        super().__init__(SERVER_BUSY_MESSAGE)


class WorkerLost(VllamaError):
    code = ErrorCode.WORKER_LOST


class StreamBroken(VllamaError):
    code = ErrorCode.STREAM_BROKEN


class Unavailable(VllamaError):
    code = ErrorCode.UNAVAILABLE


class Forbidden(VllamaError):
    code = ErrorCode.FORBIDDEN


class InsufficientStorage(VllamaError):
    code = ErrorCode.INSUFFICIENT_STORAGE


class Upstream(VllamaError):
    code = ErrorCode.UPSTREAM


def from_code(code: str, message: str) -> VllamaError:
    """Rebuild an error carried in an error frame."""
    try:
        parsed = ErrorCode(code)
    except ValueError:
        parsed = ErrorCode.INTERNAL
    return VllamaError(message, parsed)
