"""Embedding vectors in frames (common/protocol.EmbeddingsFrame): raw float32, base64, a run
of consecutive inputs' vectors per frame. The worker packs them, the API unpacks them."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import numpy as np

from common.protocol import EmbeddingsFrame

# Vectors per frame: about this many bytes of them (a pub/sub message stays small).
FRAME_BYTES = 1 << 20


def frames_of(vectors: np.ndarray) -> Iterator[dict[str, Any]]:
    """EmbeddingsFrame fields for consecutive runs of vectors, about FRAME_BYTES each."""
    count, dim = vectors.shape
    step = max(1, FRAME_BYTES // max(1, dim * 4))
    for first in range(0, count, step):
        chunk = vectors[first:first + step]
        yield {"first": first, "count": len(chunk), "dim": dim, "data": base64.b64encode(chunk.tobytes()).decode()}


def vectors_of(frames: list[EmbeddingsFrame]) -> np.ndarray:
    """The vectors of a job's EmbeddingsFrames, in input order (the API's side)."""
    if not frames:
        return np.zeros((0, 0), dtype=np.float32)
    dim = frames[0].dim
    parts = [np.frombuffer(base64.b64decode(f.data), dtype="<f4").reshape(f.count, dim)
             for f in sorted(frames, key=lambda f: f.first)]
    return np.concatenate(parts)
