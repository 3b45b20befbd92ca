"""The OpenAPI document (/openapi.json, /docs) with every request and response body.

Routes parse their bodies themselves (api/errors.parse_body: JSON whatever the Content-Type,
as Ollama accepts ``curl -d``), so FastAPI sees no body parameter and documents none. This
module adds them from one table, ``OPERATIONS``: per (method, path), the pydantic model of the
request body, and the answers by status code (api/openapi_responses.py). Parsing is not
touched: a body is still accepted whatever its Content-Type; the document names JSON.

Every operation also gets a ``default`` response: the error body (Ollama's ``{"error": ...}``,
OpenAI's error object under /v1/, Anthropic's under /v1/messages), and FastAPI's 422 is
dropped, since a bad request is answered 400 (api/errors.py). An operation missing from the
table keeps what FastAPI says of it
plus that default; tests/test_fuzz.py fails when a route with a body is missing here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api import openapi_responses as r
from api.anthropic_models import CountTokensRequest, MessagesRequest
from api.batches import CreateBatch
from api.embed_models import EmbedRequest, LegacyEmbeddingsRequest, OpenAIEmbeddingsRequest
from api.files import PURPOSES
from api.jobs_routes import AsyncChatRequest, AsyncGenerateRequest
from api.model_wire import CopyRequest, CreateRequest, DeleteRequest, PullRequest, PushRequest, ShowRequest
from api.ollama_models import ChatRequest, GenerateRequest
from api.openai_models import ChatCompletionRequest, CompletionRequest
from api.responses_models import ResponsesRequest

JSON = "application/json"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
REF = "#/components/schemas/{model}"

Models = tuple[type[BaseModel], ...]


@dataclass(frozen=True)
class Answer:
    """One documented response: ``json`` one object; ``ndjson`` the lines of a stream (any of
    the models per line); ``sse`` the data of each Server-Sent Event (then ``[DONE]``);
    ``media`` a body that is not JSON; nothing: an empty body."""

    description: str
    json: Models = ()
    ndjson: Models = ()
    sse: Models = ()
    media: str | None = None


@dataclass(frozen=True)
class Operation:
    body: type[BaseModel] | None = None
    multipart: dict[str, Any] | None = None  # a multipart/form-data body's schema
    raw: str | None = None  # a body of raw bytes: its description
    answers: dict[str, Answer] = field(default_factory=dict)


def _generation(model: type[BaseModel]) -> Answer:
    return Answer('The answer: NDJSON lines while streaming ("stream": true, the default), one object '
                  'with "stream": false. A failure after the first line is a final {"error": ...} line.',
                  json=(model,), ndjson=(model, r.OllamaError))


def _openai(model: type[BaseModel]) -> Answer:
    return Answer('The completion, or with "stream": true Server-Sent Events of chunks ending in '
                  '"data: [DONE]"; a failure after the first event is an event with an error object.',
                  json=(model,), sse=(r.CompletionChunk, r.OpenAIError))


_JOB = {"202": Answer("The job, accepted and queued.", json=(r.JobObject,))}
_DONE = {"200": Answer("Done (an empty body, as Ollama answers).")}

UPLOAD = {
    "type": "object",
    "required": ["file", "purpose"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "The file (JSONL for batch input)."},
        "purpose": {"type": "string", "enum": list(PURPOSES)},
    },
}

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("post", "/api/generate"): Operation(GenerateRequest, answers={"200": _generation(r.GenerateResponse)}),
    ("post", "/api/chat"): Operation(ChatRequest, answers={"200": _generation(r.ChatResponse)}),
    ("post", "/api/embed"): Operation(EmbedRequest, answers={"200": Answer(
        "The inputs' vectors, in order.", json=(r.EmbedResponse,))}),
    ("post", "/api/embeddings"): Operation(LegacyEmbeddingsRequest, answers={"200": Answer(
        "The prompt's vector, not normalized.", json=(r.EmbeddingsResponse,))}),
    ("post", "/api/pull"): Operation(PullRequest, answers={"200": Answer(
        'Progress lines while streaming (the default); {"status": "success"} with "stream": false.',
        json=(r.PullStatus,), ndjson=(r.PullStatus, r.OllamaError))}),
    ("post", "/api/push"): Operation(PushRequest, answers={"200": Answer(
        'Progress lines while streaming (the default): retrieving manifest, "pushing <digest>" with bytes per '
        'file, pushing manifest, success; {"status": "success"} with "stream": false. The model goes to the '
        'Hugging Face repo org/name (a tag other than latest: the branch named after it).',
        json=(r.PullStatus,), ndjson=(r.PullStatus, r.OllamaError))}),
    ("get", "/api/tags"): Operation(answers={"200": Answer("Models on the stores.", json=(r.TagsResponse,))}),
    ("post", "/api/show"): Operation(ShowRequest, answers={"200": Answer("The model.", json=(r.ShowResponse,))}),
    ("get", "/api/ps"): Operation(answers={"200": Answer("Models loaded by workers.", json=(r.PsResponse,))}),
    ("delete", "/api/delete"): Operation(DeleteRequest, answers=_DONE),
    ("post", "/api/copy"): Operation(CopyRequest, answers=_DONE),
    ("post", "/api/create"): Operation(CreateRequest, answers={"200": Answer(
        'Status lines (using existing layer, creating new layer, writing manifest, success); {"status": '
        '"success"} with "stream": false.', json=(r.PullStatus,), ndjson=(r.PullStatus, r.OllamaError))}),
    ("head", "/api/blobs/{digest}"): Operation(answers={
        "200": Answer("A live model store holds the blob."), "404": Answer("No store holds it.")}),
    ("post", "/api/blobs/{digest}"): Operation(raw="The file's bytes; their sha256 must be the path's digest.", answers={
        "201": Answer("Stored."), "200": Answer("Already stored.")}),
    ("get", "/api/version"): Operation(answers={"200": Answer("The Ollama API version followed.",
                                                              json=(r.VersionResponse,))}),
    ("get", "/"): Operation(answers={"200": Answer('"Ollama is running"', media="text/plain")}),
    ("get", "/health"): Operation(answers={
        "200": Answer("Ready: Redis answers and a worker is ready.", json=(r.HealthResponse,)),
        "503": Answer("Not ready.", json=(r.HealthResponse,))}),
    ("get", "/metrics"): Operation(answers={"200": Answer("Prometheus metrics.", media="text/plain")}),
    ("post", "/v1/chat/completions"): Operation(ChatCompletionRequest,
                                                answers={"200": _openai(r.ChatCompletion)}),
    ("post", "/v1/completions"): Operation(CompletionRequest, answers={"200": _openai(r.TextCompletion)}),
    ("post", "/v1/embeddings"): Operation(OpenAIEmbeddingsRequest, answers={"200": Answer(
        "The inputs' vectors, in order.", json=(r.EmbeddingList,))}),
    ("post", "/v1/messages"): Operation(MessagesRequest, answers={"200": Answer(
        'The message, or with "stream": true Anthropic\'s Server-Sent Events (each with an "event:" line naming '
        'its type); a failure after the first event is an "error" event with an error object.',
        json=(r.AnthropicMessage,), sse=(r.AnthropicEvent, r.AnthropicError))}),
    ("post", "/v1/messages/count_tokens"): Operation(CountTokensRequest, answers={"200": Answer(
        "The prompt's tokens, as the model's chat template renders it.", json=(r.TokenCount,))}),
    ("post", "/v1/responses"): Operation(ResponsesRequest, answers={"200": Answer(
        'The response, or with "stream": true its typed Server-Sent Events (each with an "event:" line naming '
        'its type), ending in response.completed (response.incomplete when max_output_tokens cut it short); a '
        'failure after the first event is an "error" event.', json=(r.ResponseObject,), sse=(r.ResponseEvent,))}),
    ("get", "/v1/responses/{response_id}"): Operation(answers={"200": Answer(
        "A stored response (store: true), as it was answered.", json=(r.ResponseObject,))}),
    ("delete", "/v1/responses/{response_id}"): Operation(answers={"200": Answer(
        "Deleted.", json=(r.ResponseDeleted,))}),
    ("get", "/v1/models"): Operation(answers={"200": Answer("Models served.", json=(r.ModelList,))}),
    ("get", "/v1/models/{model}"): Operation(answers={"200": Answer("The model.", json=(r.ModelObject,))}),
    ("post", "/api/jobs/generate"): Operation(AsyncGenerateRequest, answers=_JOB),
    ("post", "/api/jobs/chat"): Operation(AsyncChatRequest, answers=_JOB),
    ("post", "/api/jobs/pull"): Operation(PullRequest, answers=_JOB),
    ("get", "/api/jobs"): Operation(answers={"200": Answer("Recent jobs, newest first.", json=(r.JobList,))}),
    ("get", "/api/jobs/{job_id}"): Operation(answers={"200": Answer("The job.", json=(r.JobObject,))}),
    ("get", "/api/jobs/{job_id}/stream"): Operation(answers={"200": Answer(
        "The job's answer as /api/generate or /api/chat (or /api/pull) streams it.",
        ndjson=(r.GenerateResponse, r.ChatResponse, r.PullStatus, r.OllamaError))}),
    ("delete", "/api/jobs/{job_id}"): Operation(answers={"200": Answer("The job, cancelled.",
                                                                      json=(r.JobObject,))}),
    ("post", "/v1/files"): Operation(multipart=UPLOAD, answers={"200": Answer("The file.", json=(r.FileObject,))}),
    ("get", "/v1/files"): Operation(answers={"200": Answer("Files.", json=(r.FileList,))}),
    ("get", "/v1/files/{file_id}"): Operation(answers={"200": Answer("The file.", json=(r.FileObject,))}),
    ("get", "/v1/files/{file_id}/content"): Operation(answers={"200": Answer("The file's bytes.",
                                                                            media="application/octet-stream")}),
    ("delete", "/v1/files/{file_id}"): Operation(answers={"200": Answer("Deleted.", json=(r.FileDeleted,))}),
    ("post", "/v1/batches"): Operation(CreateBatch, answers={"200": Answer("The batch.", json=(r.BatchObject,))}),
    ("get", "/v1/batches"): Operation(answers={"200": Answer("Batches, newest first.", json=(r.BatchList,))}),
    ("get", "/v1/batches/{batch_id}"): Operation(answers={"200": Answer("The batch.", json=(r.BatchObject,))}),
    ("post", "/v1/batches/{batch_id}/cancel"): Operation(answers={"200": Answer("The batch, cancelling.",
                                                                               json=(r.BatchObject,))}),
}

_CHAT = [{"role": "user", "content": "Why is the sky blue?"}]
# What /docs' "Try it out" starts from: a request that works against the bundled model.
EXAMPLES: dict[str, dict[str, Any]] = {
    "/api/generate": {"model": "smollm2:135m", "prompt": "Why is the sky blue?", "stream": False},
    "/api/chat": {"model": "smollm2:135m", "messages": _CHAT, "stream": False},
    "/api/embed": {"model": "all-minilm", "input": ["Why is the sky blue?", "Why is grass green?"]},
    "/api/embeddings": {"model": "all-minilm", "prompt": "Why is the sky blue?"},
    "/v1/embeddings": {"model": "all-minilm", "input": ["Why is the sky blue?", "Why is grass green?"]},
    "/api/pull": {"model": "smollm2:135m", "stream": False},
    "/api/push": {"model": "you/my-model", "stream": False},
    "/api/show": {"model": "smollm2:135m"},
    "/api/delete": {"model": "my-copy"},
    "/api/copy": {"source": "smollm2:135m", "destination": "my-copy"},
    "/api/create": {"model": "pirate", "from": "smollm2:135m", "system": "You are a pirate.",
                    "parameters": {"temperature": 0.3}},
    "/v1/chat/completions": {"model": "smollm2:135m", "messages": _CHAT},
    "/v1/completions": {"model": "smollm2:135m", "prompt": "The sky is blue because", "max_tokens": 32},
    "/v1/responses": {"model": "smollm2:135m", "input": "Why is the sky blue?", "max_output_tokens": 64},
    "/v1/messages": {"model": "smollm2:135m", "max_tokens": 64, "messages": _CHAT},
    "/v1/messages/count_tokens": {"model": "smollm2:135m", "messages": _CHAT},
    "/api/jobs/generate": {"model": "smollm2:135m", "prompt": "Why is the sky blue?", "priority": "batch"},
    "/api/jobs/chat": {"model": "smollm2:135m", "messages": _CHAT, "priority": "batch"},
    "/api/jobs/pull": {"model": "smollm2:135m"},
    "/v1/batches": {"input_file_id": "file-...", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
}

BODY_NOTE = ("JSON. Any Content-Type is accepted (as Ollama does), so `curl -d '{...}'`, which sends "
             "application/x-www-form-urlencoded, works too.")
DOC_NOTE = ("Ollama's API (/api/...), OpenAI's (/v1/...) and Anthropic's Messages API (/v1/messages) over "
            "one queue of workers. Request bodies are JSON whatever their Content-Type. Errors are Ollama's "
            "{\"error\": \"...\"} outside /v1/, Anthropic's error object under /v1/messages and OpenAI's "
            "elsewhere under /v1/.")


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and so /openapi.json and /docs) describe every body."""
    base: Callable[[], dict[str, Any]] = app.openapi
    described: dict[str, Any] | None = None

    def openapi() -> dict[str, Any]:
        nonlocal described
        if described is None:
            described = describe(copy.deepcopy(base()))
            app.openapi_schema = described
        return described

    app.openapi = openapi  # type: ignore[method-assign]


def describe(doc: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document with the bodies of ``OPERATIONS`` and the error responses added."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    refs = _components(schemas)
    doc["info"].setdefault("description", DOC_NOTE)
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            known = OPERATIONS.get((method, path))
            if known is not None:
                _describe(op, path, known, refs)
            op["responses"].pop("422", None)
            op["responses"]["default"] = _error(path, refs)
    _drop_unused(doc, schemas)
    return doc


def _components(schemas: dict[str, Any]) -> dict[tuple[type[BaseModel], str], dict[str, Any]]:
    """Every model as a component: request bodies as pydantic validates them, answers as the
    code writes them. Returns each (model, mode)'s ``$ref``."""
    pairs: list[tuple[type[BaseModel], Any]] = []
    for op in OPERATIONS.values():
        if op.body is not None:
            pairs.append((op.body, "validation"))
        for answer in op.answers.values():
            pairs += [(m, "serialization") for m in (*answer.json, *answer.ndjson, *answer.sse)]
    pairs += [(m, "serialization") for m in (r.OllamaError, r.OpenAIError, r.AnthropicError)]
    unique = list(dict.fromkeys(pairs))
    mapping, defs = models_json_schema(unique, ref_template=REF)
    schemas.update(defs.get("$defs", {}))
    return mapping


def _describe(op: dict[str, Any], path: str, known: Operation, refs: dict) -> None:
    if known.body is not None:
        media: dict[str, Any] = {"schema": refs[(known.body, "validation")]}
        if path in EXAMPLES:
            media["example"] = EXAMPLES[path]
        op["requestBody"] = {"required": True, "description": BODY_NOTE, "content": {JSON: media}}
    elif known.multipart is not None:
        op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": known.multipart}}}
    elif known.raw is not None:
        op["requestBody"] = {"required": True, "description": known.raw,
                             "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    if known.answers:
        op["responses"] = {status: _answer(a, refs) for status, a in known.answers.items()}


def _answer(answer: Answer, refs: dict) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if answer.json:
        content[JSON] = {"schema": _any(answer.json, refs)}
    if answer.ndjson:
        content[NDJSON] = {"schema": {"type": "array", "description": "One JSON object per line.",
                                      "items": _any(answer.ndjson, refs)}}
    if answer.sse:
        data = {"type": "string", "if": {"const": "[DONE]"},
                "else": {"contentMediaType": JSON, "contentSchema": _any(answer.sse, refs)}}
        content[SSE] = {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}
    if answer.media:
        content[answer.media] = {"schema": {"type": "string"}}
    out: dict[str, Any] = {"description": answer.description}
    if content:
        out["content"] = content
    return out


def _any(models: Models, refs: dict) -> dict[str, Any]:
    schemas = [refs[(m, "serialization")] for m in models]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _error(path: str, refs: dict) -> dict[str, Any]:
    model = r.AnthropicError if path.startswith("/v1/messages") else \
        r.OpenAIError if path.startswith("/v1/") else r.OllamaError
    return {"description": "An error: 4xx for the request, 5xx for the server; the message says what to do.",
            "content": {JSON: {"schema": refs[(model, "serialization")]}}}


def _drop_unused(doc: dict[str, Any], schemas: dict[str, Any]) -> None:
    """FastAPI's own components that nothing refers to any more (its 422 error, the form
    body it guessed for the upload)."""
    for name in ("HTTPValidationError", "ValidationError", *[n for n in schemas if n.startswith("Body_")]):
        if f'"#/components/schemas/{name}"' not in json.dumps(doc):
            schemas.pop(name, None)
