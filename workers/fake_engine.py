"""A deterministic stand-in for vLLM, for unit tests and plumbing benchmarks only.

It "tokenizes" one token per character and answers ``tok0 tok1 ...`` at a fixed pace, so
tests can reason about counts and timing without loading a model; or, given ``reply``, it
answers that canned text a few characters per token (to feed the tool-call parsers).
Features are always also tested through real vLLM.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from common.protocol import ChatMessage, Sampling, TokenLogprob, TopLogprob
from workers.engine import Delta


REPLY_CHARS_PER_TOKEN = 4
VOCAB_SIZE = 50_000  # "tokens" are characters modulo this


class FakeTokenizer:
    """Enough of a tokenizer for vLLM's tool parsers, which read only its vocabulary."""

    def get_vocab(self) -> dict[str, int]:
        return {}


class FakeEngine:
    def __init__(
        self, *, max_model_len: int = 2048, max_num_seqs: int = 64, answer_tokens: int = 16, step_s: float = 0.0,
        reply: str | None = None,
    ) -> None:
        self.tokenizer = FakeTokenizer()
        self.reply = reply
        # The latest chat's messages as a template reads them, and its tools.
        self.last_chat: tuple[list[dict[str, Any]], list[dict[str, Any]] | None] | None = None
        self.last_sampling: Sampling | None = None
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.vocab_size = VOCAB_SIZE
        self.answer_tokens = answer_tokens
        self.step_s = step_s
        self.aborted: list[str] = []
        self.started: list[str] = []
        self._in_flight: set[str] = set()
        self._dead = False

    def encode_chat(self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None) -> list[int]:
        self.last_chat = ([m.for_template() for m in messages], tools)
        text = "".join(f"<{m.role}>{m.content}" for m in messages) + "<assistant>"
        return [ord(c) % VOCAB_SIZE for c in text]

    def encode_raw(self, text: str) -> list[int]:
        return [ord(c) % VOCAB_SIZE for c in text]

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling, max_tokens: int, priority: int = 0
    ) -> AsyncIterator[Delta]:
        self.started.append(request_id)
        self.last_sampling = sampling
        self._in_flight.add(request_id)
        size = self.answer_tokens if self.reply is None else -(-len(self.reply) // REPLY_CHARS_PER_TOKEN)
        n = min(size, max_tokens)
        try:
            for i in range(n):
                await asyncio.sleep(self.step_s)
                if self._dead:
                    raise RuntimeError("the fake engine's process died")
                last = i == n - 1
                finish = None
                if last:  # the counting answer says "length" also when max_tokens is exactly its size
                    finish = "length" if max_tokens < size + (self.reply is None) else "stop"
                yield Delta(text=self._piece(i), num_tokens=1, token_ids=[1000 + i], finish_reason=finish,
                            logprobs=_logprobs(self._piece(i), sampling.logprobs))
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise
        finally:
            self._in_flight.discard(request_id)

    def _piece(self, i: int) -> str:
        if self.reply is None:
            return f"tok{i} "
        return self.reply[i * REPLY_CHARS_PER_TOKEN:(i + 1) * REPLY_CHARS_PER_TOKEN]

    def in_flight(self) -> int:
        return len(self._in_flight)

    def dead(self) -> bool:
        return self._dead

    def kill(self) -> None:
        """What a killed engine process looks like: every request fails, now and later."""
        self._dead = True

    def scheduler_stats(self) -> tuple[int, int, float]:
        return len(self._in_flight), 0, 0.0

    def close(self) -> None:
        pass


def _logprobs(piece: str, top: int | None) -> list[TokenLogprob] | None:
    """The piece was the likeliest token (-0.25); ``alt1``, ``alt2``, ... came next."""
    if top is None:
        return None
    alternatives = [TopLogprob(token=piece, logprob=-0.25)] + \
        [TopLogprob(token=f"alt{j}", logprob=-1.0 - j) for j in range(1, top)]
    return [TokenLogprob(token=piece, logprob=-0.25, top=alternatives[:top])]
