"""Figures the fault tests measure, printed with each run (``-s`` shows them as they come).

The bounds the tests assert are generous on purpose (a busy 2-core machine); the figures say
how far inside them the cluster really was, which is what a fix should move.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

FIGURES_FILE_ENV = "VLLAMA_TEST_FIGURES"  # a JSONL file to append every test's figures to


def report(test: str, **figures: object) -> None:
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in figures.items())
    print(f"\nFIGURES {test}: {shown}", flush=True)
    path = os.environ.get(FIGURES_FILE_ENV)
    if path:
        with Path(path).open("a") as f:
            f.write(json.dumps({"test": test, "at": time.time(), **figures}, default=str) + "\n")


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(_fmt, v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def worst(values: list[float | None]) -> float | None:
    """The largest figure, or None if any is missing (a client that never got its line)."""
    if any(v is None for v in values):
        return None
    return max(values, default=0.0)
