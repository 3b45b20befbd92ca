"""Fitting a conversation into the context window, as Ollama does.

Ollama never refuses a prompt for being too long unless asked to (``truncate: false``):
- a chat loses its oldest messages first, keeping every system message before them and
  always the latest message;
- what is still too long (one huge message, a raw prompt, an old ``context``) is cut by
  tokens: the first ``num_keep`` are kept (the start of the system prompt), then the most
  recent ones, leaving half of the rest of the window free to answer in;
- an answer that reaches the end of the window "shifts" (``shift``) the same way and goes on,
  up to ``num_predict``.

vLLM cannot drop tokens from a running request's KV cache, so a shift here ends the engine
request and starts the next one from the cut tokens (prompt and answer so far): the same
tokens Ollama's runner keeps, at the price of one more prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

DEFAULT_NUM_KEEP = 4  # Ollama's default options.num_keep

T = TypeVar("T")


def keep_count(num_keep: int | None, prompt_len: int, window: int) -> int:
    """How many tokens at the start survive a cut: ``num_keep`` (-1: the whole prompt), at
    most two short of the window so that a cut always frees room."""
    keep = DEFAULT_NUM_KEEP if num_keep is None else num_keep
    if keep < 0:
        keep = prompt_len
    return max(0, min(keep, window - 2))


def cut(tokens: list[int], keep: int, window: int) -> list[int]:
    """``tokens`` that fill the window or more, cut as Ollama's runner does: the first
    ``keep``, then the most recent, dropping half of what follows ``keep`` in a full window."""
    room = window - keep
    tail = room - max(1, room // 2)
    return tokens[:keep] + tokens[len(tokens) - tail:]


def fitting_messages(messages: list[T], is_system: Callable[[T], bool], fits: Callable[[list[T]], bool]) -> list[T]:
    """The longest recent part of ``messages`` that ``fits``, with the system messages before
    it in front; the latest message is always kept, even if it alone does not fit (it is then
    cut by tokens). ``fits`` renders and counts, so it is called O(log n) times."""

    def kept_from(start: int) -> list[T]:
        return [m for m in messages[:start] if is_system(m)] + messages[start:]

    # The whole conversation did not fit (the caller tried): the answer is in [1, len - 1].
    low, high = min(1, len(messages) - 1), len(messages) - 1
    while low < high:
        middle = (low + high) // 2
        if fits(kept_from(middle)):
            high = middle
        else:
            low = middle + 1
    return kept_from(high)
