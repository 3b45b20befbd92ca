"""Ollama's ``keep_alive``: a Go duration string ("5m", "1h30m", "300ms", "-1m") or a number of
seconds. Negative means "keep loaded forever"; 0 means "unload as soon as idle".

Positive values are bounded by Go's longest duration (about 292 years), the most Ollama
accepts: beyond it an expiry time cannot even be written down (1e300 s once made /api/ps fail
for every client while the model stayed loaded).
"""

from __future__ import annotations

import math
import re

from common.errors import BadRequest

FOREVER = -1.0
MAX_SECONDS = (2**63 - 1) / 1e9  # Go's time.Duration: int64 nanoseconds, about 292 years
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_HINT = 'use a duration such as "5m", "1h" or "30s", a number of seconds, 0 to unload, or -1 to keep the model loaded'


def parse_keep_alive(value: float | int | str) -> float:
    """Seconds to stay loaded when idle, or FOREVER; BadRequest for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest(f"invalid keep_alive {_shown(value)}: {_HINT}")
    if isinstance(value, str):
        seconds = _parse_go_duration(value.strip())
    else:
        try:
            seconds = float(value)
        except OverflowError:  # an int too big for a float
            seconds = math.inf if value > 0 else -math.inf
    if not math.isfinite(seconds):
        raise BadRequest(f"invalid keep_alive {_shown(value)}: it must be a finite number; {_HINT}")
    if seconds > MAX_SECONDS:
        raise BadRequest(f"keep_alive {_shown(value)} is longer than the longest duration Ollama takes "
                         f"(about 292 years); use -1 to keep the model loaded")
    return FOREVER if seconds < 0 else seconds


def _parse_go_duration(text: str) -> float:
    try:
        return float(text)  # "300" and "-1" arrive as strings from some clients
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if body and _PART.sub("", body) == "" and (parts := _PART.findall(body)):
        return sign * sum(float(n) * _UNITS[u] for n, u in parts)
    raise BadRequest(f"invalid keep_alive {_shown(text)}: {_HINT}")


def _shown(value: object) -> str:
    text = f'"{value}"' if isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
