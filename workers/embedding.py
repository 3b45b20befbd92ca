"""Embedding jobs: one job holds every input of a request (Ollama's ``input`` list, OpenAI's
``input`` array); they go to the engine all at once, so vLLM batches them, and the vectors go
back to the API in frames of raw float32 (common/protocol.EmbeddingsFrame)."""

from __future__ import annotations

from typing import Any

import numpy as np

from common.errors import BadRequest
from common.protocol import EmbedInput
from workers.engine import Engine

def prompts_of(engine: Engine, spec: EmbedInput, model: str) -> list[list[int]]:
    """Each input's token ids, cut to the context when ``truncate``; else an input longer
    than the context is refused (as Ollama does), before anything runs."""
    window = engine.max_model_len
    if spec.texts:
        prompts = engine.encode_inputs(spec.texts, window if spec.truncate else None)
    else:
        vocab = engine.vocab_size
        for i, ids in enumerate(spec.token_ids):
            if bad := next((t for t in ids if not 0 <= t < vocab), None):
                raise BadRequest(f"input[{i}] holds token {bad}, which is not a token of {model} (its vocabulary "
                                 f"has {vocab}); send text, or token ids of this model's tokenizer")
        prompts = [ids[:window] if spec.truncate else ids for ids in spec.token_ids]
    for i, ids in enumerate(prompts):
        if len(ids) > window:
            raise BadRequest(f"the input length exceeds the context length: input {i} is {len(ids)} tokens and "
                             f"{model} takes {window}; shorten it, or leave truncate on to cut it to fit")
    return prompts


def shaped(vectors: Any, spec: EmbedInput) -> np.ndarray:
    """The engine's vectors cut to ``dimensions`` (the first numbers of each: what models
    trained for it, Matryoshka-style, expect) and then L2-normalized when asked."""
    vectors = np.asarray(vectors, dtype=np.float32)
    size = vectors.shape[1]
    if spec.dimensions is not None:
        if spec.dimensions > size:
            raise BadRequest(f"dimensions is {spec.dimensions}, but this model's embeddings have {size}; "
                             f"ask for 1 to {size}, or leave dimensions out")
        vectors = vectors[:, :spec.dimensions]
    if spec.normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms == 0, 1, norms)  # an all-zero vector stays so
    return np.ascontiguousarray(vectors, dtype="<f4")
