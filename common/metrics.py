"""Counters and histograms that travel in worker heartbeats, and Prometheus's text format.

Workers have no HTTP server: each reports its cumulative numbers per loaded model in its
heartbeat (JSON, like everything in Redis), and any API replica's /metrics renders every live
worker's numbers with ``worker`` and ``model`` labels. Counters restart when a model is
reloaded, which Prometheus's rate() understands as a counter reset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pydantic import BaseModel, Field

# Seconds. Time to first token spans a small model on a GPU to a long prompt on a CPU.
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TPOT_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5]
# Seconds a job waited between its request's arrival and a worker starting it: about a
# millisecond when a worker has room, up to VLLAMA_QUEUE_TIMEOUT_S when none has.
QUEUE_WAIT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                      300.0]


class Histogram(BaseModel):
    buckets: list[float]
    counts: list[int] = Field(default_factory=list)  # per bucket, not cumulative; the last is +Inf
    sum: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        self.counts[index] += 1
        self.sum += value
        self.count += 1


class ModelStats(BaseModel):
    """One model on one worker, since it was loaded there."""

    # Ended jobs by status. All keys exist from the start: the heartbeat thread serializes this
    # while the event loop counts, so the dict must never change size.
    jobs: dict[str, int] = Field(default_factory=lambda: {"done": 0, "failed": 0, "cancelled": 0})
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft: Histogram = Field(default_factory=lambda: Histogram(buckets=TTFT_BUCKETS))
    tpot: Histogram = Field(default_factory=lambda: Histogram(buckets=TPOT_BUCKETS))
    queue_wait: Histogram = Field(default_factory=lambda: Histogram(buckets=QUEUE_WAIT_BUCKETS))
    # The engine's own view, at the last heartbeat (vLLM's scheduler statistics).
    engine_running: int = 0
    engine_waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    # Prompt tokens the engine looked up in its prefix cache, and found there (vLLM's counters).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    def ended(self, status: str) -> None:
        self.jobs[status] += 1


# ---------------------------------------------------------------- Prometheus text format


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class Exposition:
    """Metric families in Prometheus's text format (version 0.0.4)."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[dict[str, str], float]]) -> None:
        self._lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self._lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]

    def histogram(self, name: str, help_text: str, samples: Iterable[tuple[dict[str, str], Histogram]]) -> None:
        self._lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for labels, h in samples:
            counts = h.counts or [0] * (len(h.buckets) + 1)
            running = 0
            for bound, n in zip([*h.buckets, math.inf], counts):
                running += n
                self._lines.append(f"{name}_bucket{_labels({**labels, 'le': _number(float(bound))})} {running}")
            self._lines.append(f"{name}_sum{_labels(labels)} {_number(h.sum)}")
            self._lines.append(f"{name}_count{_labels(labels)} {h.count}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"
