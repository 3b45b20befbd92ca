"""Ollama's ``keep_alive``: a Go duration string ("5m", "1h30m", "300ms", "-1m") or a number of
seconds. Negative means "keep loaded forever"; 0 means "unload as soon as idle"."""

from __future__ import annotations

import math
import re

from common.errors import BadRequest

FOREVER = -1.0
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_keep_alive(value: float | int | str) -> float:
    """Seconds to stay loaded when idle, or FOREVER."""
    if isinstance(value, bool):
        raise BadRequest(f"invalid keep_alive {value!r}: use a duration such as \"5m\", seconds, or -1")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        seconds = _parse_go_duration(value.strip())
    if math.isnan(seconds):
        raise BadRequest("invalid keep_alive: NaN")
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
    raise BadRequest(f'invalid keep_alive "{text}": use a duration such as "5m", "1h" or "30s", '
                     "a number of seconds, 0 to unload, or -1 to keep the model loaded")
