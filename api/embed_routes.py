"""Embeddings: Ollama's POST /api/embed and /api/embeddings, OpenAI's POST /v1/embeddings.

Each request is one job on the model's queue, like a generation; its worker embeds every input
at once (vLLM batches them) and sends the vectors back as raw float32 frames. Vectors go out as
JSON numbers written from float32 (as short as the number needs), or for OpenAI's
``encoding_format: base64`` as the same float32 bytes, which is what OpenAI's clients decode.
"""

from __future__ import annotations

import base64

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from api import ownership
from api.answers import Answer, whole_answer
from api.dispatch import Dispatcher
from api.embed_models import EmbedRequest, LegacyEmbeddingsRequest, OpenAIEmbeddingsRequest
from api.errors import parse_body
from api.limits import RequestLimits
from api.ollama_routes import load_or_unload
from common.protocol import GenerationJob
from common.vectors import vectors_of

router = APIRouter()


def _json(body: dict) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


async def _embedded(request: Request, job: GenerationJob, keep_alive: float | None = None) -> tuple[np.ndarray, Answer]:
    dispatcher: Dispatcher = request.app.state.dispatcher
    ownership.stamp(request, [job])  # usage per API key
    answer = await whole_answer(request, await dispatcher.submit(job, keep_alive))
    return vectors_of(answer.vectors), answer


@router.post("/api/embed")
async def embed(request: Request) -> Response:
    body = await parse_body(request, EmbedRequest)
    dispatcher: Dispatcher = request.app.state.dispatcher
    job = body.to_job(RequestLimits.of(dispatcher.settings))
    if not job.embed.texts:  # as Ollama: nothing to embed, an empty list (the model loaded)
        await load_or_unload(request, dispatcher, job.model, body.keep_alive_s())
        return _json({"model": body.model, "embeddings": []})
    vectors, answer = await _embedded(request, job, body.keep_alive_s())
    stats = answer.done.stats
    return _json({"model": body.model, "embeddings": vectors, "total_duration": stats.total_duration,
                  "load_duration": stats.load_duration, "prompt_eval_count": stats.prompt_eval_count})


@router.post("/api/embeddings")
async def embeddings(request: Request) -> Response:
    """The older endpoint: one prompt, its vector as the model makes it (not normalized)."""
    body = await parse_body(request, LegacyEmbeddingsRequest)
    dispatcher: Dispatcher = request.app.state.dispatcher
    job = body.to_job(RequestLimits.of(dispatcher.settings))
    if not body.prompt:
        await load_or_unload(request, dispatcher, job.model, body.keep_alive_s())
        return _json({"embedding": []})
    vectors, _ = await _embedded(request, job, body.keep_alive_s())
    return _json({"embedding": vectors[0]})


@router.post("/v1/embeddings")
async def openai_embeddings(request: Request) -> Response:
    body = await parse_body(request, OpenAIEmbeddingsRequest)
    dispatcher: Dispatcher = request.app.state.dispatcher
    vectors, answer = await _embedded(request, body.to_job(RequestLimits.of(dispatcher.settings)))
    return _json(embedding_list(vectors, body.model, answer.done.stats.prompt_eval_count,
                                body.encoding_format == "base64"))


def embedding_list(vectors: np.ndarray, model: str, tokens: int, as_base64: bool) -> dict:
    """OpenAI's answer to /v1/embeddings (also a batch line's), numbers as numpy floats."""
    if as_base64:
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = list(vectors)
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
