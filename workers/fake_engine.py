"""A deterministic stand-in for vLLM, for unit tests and plumbing benchmarks only.

It "tokenizes" one token per character and answers ``tok0 tok1 ...`` at a fixed pace, so
tests can reason about counts and timing without loading a model. Features are always also
tested through real vLLM.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from common.protocol import ChatMessage, Sampling
from workers.engine import Delta


class FakeEngine:
    def __init__(
        self, *, max_model_len: int = 2048, max_num_seqs: int = 64, answer_tokens: int = 16, step_s: float = 0.0
    ) -> None:
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.answer_tokens = answer_tokens
        self.step_s = step_s
        self.aborted: list[str] = []
        self.started: list[str] = []
        self._in_flight: set[str] = set()

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        text = "".join(f"<{m.role}>{m.content}" for m in messages) + "<assistant>"
        return [ord(c) % 50_000 for c in text]

    def encode_raw(self, text: str) -> list[int]:
        return [ord(c) % 50_000 for c in text]

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling, max_tokens: int
    ) -> AsyncIterator[Delta]:
        self.started.append(request_id)
        self._in_flight.add(request_id)
        n = min(self.answer_tokens, max_tokens)
        try:
            for i in range(n):
                await asyncio.sleep(self.step_s)
                last = i == n - 1
                finish = None
                if last:
                    finish = "length" if max_tokens <= self.answer_tokens else "stop"
                yield Delta(text=f"tok{i} ", num_tokens=1, token_ids=[1000 + i], finish_reason=finish)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise
        finally:
            self._in_flight.discard(request_id)

    def in_flight(self) -> int:
        return len(self._in_flight)

    def close(self) -> None:
        pass
