"""The shapes of the API's answers, for the OpenAPI document only (api/openapi_bodies.py).

The routes build their answers as dicts (api/ndjson.py, api/openai_routes.py, ...); these
models state what every answer holds, so /docs shows it and the fuzzing run
(tests/test_fuzz.py) checks each response against it. They name the fields that are always
there as required and allow more (``extra="allow"``): a new field in an answer is not a
breaking change, a missing one is. Keep them in step with the code that builds the answers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# ------------------------------------------------------------------ errors


class OllamaError(_Open):
    """Every error outside /v1/: Ollama's body."""

    error: str


class OpenAIErrorDetail(_Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(_Open):
    """Every error under /v1/ but the Messages API's: OpenAI's error object."""

    error: OpenAIErrorDetail


class AnthropicErrorDetail(_Open):
    type: str
    message: str


class AnthropicError(_Open):
    """Every error of the Messages API (/v1/messages...): Anthropic's error object."""

    type: Literal["error"]
    error: AnthropicErrorDetail


# ------------------------------------------------------------------ Ollama generation


class TokenLogprobOut(_Open):
    token: str
    logprob: float
    bytes: list[int]


class FunctionOut(_Open):
    name: str
    arguments: dict[str, Any]
    index: int | None = None


class ToolCallOut(_Open):
    function: FunctionOut
    id: str | None = None


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str
    thinking: str | None = None  # a model that thinks: its reasoning, apart from the content
    tool_calls: list[ToolCallOut] | None = None


class _Final(_Open):
    """Present once ``done`` is true (after a generation; a load answer has only done_reason)."""

    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class GenerateResponse(_Final):
    """/api/generate: each NDJSON line while streaming, or the one object with "stream": false."""

    model: str
    created_at: str
    response: str
    thinking: str | None = None  # a model that thinks: its reasoning, apart from the response
    context: list[int] | None = None
    logprobs: list[TokenLogprobOut] | None = None


class ChatResponse(_Final):
    """/api/chat: each NDJSON line while streaming, or the one object with "stream": false."""

    model: str
    created_at: str
    message: AssistantMessage
    logprobs: list[TokenLogprobOut] | None = None


class EmbedResponse(_Open):
    """/api/embed: one L2-normalized vector per input."""

    model: str
    embeddings: list[list[float]]


class EmbeddingsResponse(_Open):
    """/api/embeddings: the prompt's vector (empty for an empty prompt)."""

    embedding: list[float]


class PullStatus(_Open):
    """/api/pull: each progress line, or {"status": "success"} with "stream": false."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


# ------------------------------------------------------------------ Ollama models


class ModelDetails(_Open):
    format: str | None = None
    family: str | None = None
    parameter_size: str | None = None
    quantization_level: str | None = None


class TagEntry(_Open):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(_Open):
    models: list[TagEntry]


class ShowResponse(_Open):
    modelfile: str
    details: ModelDetails
    capabilities: list[str]


class PsEntry(_Open):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int


class PsResponse(_Open):
    models: list[PsEntry]


class VersionResponse(_Open):
    version: str


class HealthResponse(_Open):
    """More detail (Redis, workers) may follow ``status``."""

    status: Literal["ok", "unavailable"]


# ------------------------------------------------------------------ OpenAI


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(_Open):
    index: int
    message: dict[str, Any]
    finish_reason: str | None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(_Open):
    index: int
    text: str
    finish_reason: str | None


class TextCompletion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class CompletionChunk(_Open):
    """One Server-Sent Event's data while streaming (the stream ends with ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk", "text_completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]


class AnthropicUsage(_Open):
    input_tokens: int
    output_tokens: int


class AnthropicMessage(_Open):
    """The Messages API's answer: content blocks (thinking, text, tool_use) and why it stopped."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None
    usage: AnthropicUsage


class AnthropicEvent(_Open):
    """One Server-Sent Event's data while streaming a message (its ``event:`` line names the
    same type): message_start, ping, content_block_start/delta/stop, message_delta, message_stop."""

    type: Literal["message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
                  "message_delta", "message_stop"]


class TokenCount(_Open):
    input_tokens: int


class ResponseObject(_Open):
    """The Responses API's answer: output items (reasoning, message, function_call) and usage."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None


class ResponseEvent(_Open):
    """One Server-Sent Event's data while streaming a response (its ``event:`` line names the
    same type): response.created, response.output_text.delta, ..., response.completed, or an
    error event."""

    type: str
    sequence_number: int


class ResponseDeleted(_Open):
    id: str
    object: Literal["response"]
    deleted: Literal[True]


class ModelObject(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class EmbeddingUsage(_Open):
    prompt_tokens: int
    total_tokens: int


class EmbeddingObject(_Open):
    object: Literal["embedding"]
    embedding: list[float] | str  # a string: encoding_format "base64" (float32, little-endian)
    index: int


class EmbeddingList(_Open):
    object: Literal["list"]
    model: str
    data: list[EmbeddingObject]
    usage: EmbeddingUsage


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelObject]


class FileObject(_Open):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str


class FileList(_Open):
    object: Literal["list"]
    data: list[FileObject]


class FileDeleted(_Open):
    id: str
    object: Literal["file"]
    deleted: bool


class RequestCounts(_Open):
    total: int
    completed: int
    failed: int


class BatchObject(_Open):
    id: str
    object: Literal["batch"]
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    request_counts: RequestCounts


class BatchList(_Open):
    object: Literal["list"]
    data: list[BatchObject]
    has_more: bool


# ------------------------------------------------------------------ jobs


class JobObject(_Open):
    """An async job; /api/jobs/{id} adds the output so far and, once done, the result."""

    id: str
    type: str
    model: str
    status: str
    created_at: str | None


class JobList(_Open):
    jobs: list[JobObject]
