"""What the request models share: the bounds of what the engine and the JSON wire can take.

Every number a request carries ends up in vLLM's sampler (as a 32-bit int, a 64-bit seed, a
float that must be finite) or in a datetime (keep_alive). A value outside those ranges used to
pass parsing and fail later, far from the request, as a 500 or a dead engine. So the request
models check each bound here, once, and say which field is wrong; workers then trust the job.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

from common.errors import BadRequest
from common.protocol import Sampling

INT32_MAX = 2**31 - 1  # vLLM keeps top_k, token counts and token ids in 32-bit ints
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # vLLM seeds torch's generator with a 64-bit signed int
MAX_STOP_CHARS = 1000  # vLLM holds back this much streamed text and searches it every token
MAX_OLLAMA_STOPS = 64  # Ollama has no limit; autocomplete clients send a dozen or so
MAX_OPENAI_STOPS = 4  # OpenAI's documented limit


class WireModel(BaseModel):
    """A request body: unknown fields are ignored (as Ollama and OpenAI do), and floats must be
    finite (JSON has no NaN or Infinity, but Python's parser reads them, and 1e999 is inf)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def _finite(value: Any) -> Any:
    """Walks a free-form JSON value (a schema, tool arguments) looking for NaN or Infinity."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("contains NaN or Infinity, which JSON does not allow; send finite numbers")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


# A free-form JSON object (format schema, tools, tool call arguments) with only finite numbers.
JsonObject = Annotated[dict[str, Any], AfterValidator(_finite)]


def check_int(field: str, value: int | None, low: int, high: int, hint: str = "") -> None:
    """BadRequest naming ``field`` when ``value`` lies outside [low, high]."""
    if value is not None and not low <= value <= high:
        raise BadRequest(f"{field} is {_short(value)}: it must be between {low} and {high}{hint}")


def check_seed(field: str, seed: int | None) -> None:
    check_int(field, seed, SEED_MIN, SEED_MAX, " (a 64-bit signed integer)")


def check_token_ids(field: str, ids: list[int]) -> None:
    """Token ids the API can judge without the vocabulary: none negative or beyond 32 bits.
    The worker checks them against its model's vocabulary."""
    for i, token in enumerate(ids):
        if not 0 <= token <= INT32_MAX:
            raise BadRequest(f"{field}[{i}] is {_short(token)}, which is not a token id: send back the context of "
                             "an earlier answer unchanged, or leave it out")


def hosted_sampling(temperature: float | None, top_p: float | None, max_temperature: float = 2.0) -> Sampling:
    """Sampling with the hosted APIs' defaults (temperature 1, top_p 1, no top_k: OpenAI's and
    Anthropic's, not Ollama's) and the request's temperature and top_p, checked."""
    s = Sampling(temperature=1.0, top_k=0, top_p=1.0)
    if temperature is not None:
        if not 0 <= temperature <= max_temperature:
            raise BadRequest(f"temperature must be between 0 and {max_temperature:g}")
        s.temperature = temperature
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise BadRequest("top_p must be more than 0 and at most 1")
        s.top_p = top_p
    return s


def stop_strings(field: str, stop: str | list[str] | None, most: int) -> list[str]:
    """The stop strings, empty ones dropped; BadRequest when there are too many or one is too long."""
    if stop is None:
        return []
    found = [stop] if isinstance(stop, str) else [s for s in stop if s]
    if len(found) > most:
        raise BadRequest(f"{field} has {len(found)} strings; send at most {most}")
    for s in found:
        if len(s) > MAX_STOP_CHARS:
            raise BadRequest(f"{field} has a string of {len(s)} characters; each may have at most {MAX_STOP_CHARS}")
    return found


def _short(value: int) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:10]}...({len(text)} digits)"
