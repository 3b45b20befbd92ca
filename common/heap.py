"""Keep the garbage collector's pauses out of the event loop's way.

CPython's full collection walks every tracked object. A process that has imported its web
framework, Redis client and pydantic models holds about 70,000 of them before it serves a
request (a worker with vLLM loaded, millions), and one full collection of those took 50-60
ms on a 2-core machine: every stream of the process stalled meanwhile, and jobs waited that
long to start. None of those objects ever becomes garbage, so once a process is set up it
moves them out of the collector's sight (``gc.freeze``), and collections walk only what
requests create. Young collections run less often too: at thousands of frames a second the
default threshold (700 allocations) ran hundreds a second.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000


def settle() -> None:
    """Call once the process is set up (imports done, app or engine built), and again after
    anything big is loaded (a model)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
