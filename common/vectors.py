"""Embedding vectors in frames (common/protocol.EmbeddingsFrame): raw float32, base64, a run
of consecutive inputs' vectors per frame. The worker packs them, the API unpacks them."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np

from common.protocol import Vectors

# Vectors per frame: about this many bytes of them (a pub/sub message stays small).
FRAME_BYTES = 1 << 20


def runs_of(vectors: np.ndarray) -> Iterator[Vectors]:
    """Consecutive runs of the vectors, about FRAME_BYTES each (a frame's worth)."""
    count, dim = vectors.shape
    step = max(1, FRAME_BYTES // max(1, dim * 4))
    for first in range(0, count, step):
        chunk = vectors[first:first + step]
        yield Vectors(first=first, count=len(chunk), dim=dim, data=base64.b64encode(chunk.tobytes()).decode())


def vectors_of(frames: list[Vectors]) -> np.ndarray:
    """The vectors of a job's EmbeddingsFrames (or its result's runs), in input order."""
    if not frames:
        return np.zeros((0, 0), dtype=np.float32)
    dim = frames[0].dim
    parts = [np.frombuffer(base64.b64decode(f.data), dtype="<f4").reshape(f.count, dim)
             for f in sorted(frames, key=lambda f: f.first)]
    return np.concatenate(parts)
