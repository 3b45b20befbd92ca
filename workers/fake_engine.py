"""A deterministic stand-in for vLLM, for unit tests and plumbing benchmarks only.

It "tokenizes" one token per character and answers ``tok0 tok1 ...`` (or, when the prompt
says ``label:NAME``, ``NAME:0 NAME:1 ...``, so that concurrent streams have distinct answers),
so tests can reason about counts and timing without loading a model; or, given ``reply``, it
answers that canned text a few characters per token, each think marker a token of its own (to
feed the tool-call and reasoning parsers). ``chat_template`` is what a real model's template
would say about it (whether it thinks, and how).
Features are always also tested through real vLLM.

With ``embedding=True`` it is an embedding model instead: a vector of ``EMBED_DIM`` numbers
per input, made from its "tokens" (equal inputs, equal vectors), after ``step_s``.

Two paces:
- per request (the default): each request sleeps ``step_s`` before each of its tokens;
- stepwise (``stepwise=True``), as a GPU runs vLLM: one engine step every ``step_s`` gives one
  token to every running request at once, whatever the worker's event loop is doing (vLLM's
  engine core is a process of its own). Tokens a request has not taken yet are merged into
  its next output, as vLLM's output collector merges them for a consumer that fell behind.
  ``max_num_seqs`` requests run at once and the rest wait, so a worker's rate is capped at
  ``max_num_seqs / step_s`` tokens a second: a stand-in for one GPU in plumbing benchmarks.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

from common.protocol import ChatMessage, Sampling, TokenLogprob, TopLogprob
from common.thinking import reasoning_parser_for
from workers.engine import Delta


REPLY_CHARS_PER_TOKEN = 4
EMBED_DIM = 16
PREFIX_BLOCK = 16  # tokens per prefix-cache block, as vLLM's default
VOCAB_SIZE = 50_000  # "tokens" are characters modulo this
_LABEL = re.compile(r"label:(\w+)")


THINK_MARKERS = ("<think>", "</think>")
_MARKERS = re.compile("(" + "|".join(map(re.escape, THINK_MARKERS)) + ")")


class FakeTokenizer:
    """Enough of a tokenizer for vLLM's tool and reasoning parsers: a vocabulary (the think
    markers, one token each) and the text of each token the fake engine made."""

    def __init__(self, special_tokens: tuple[str, ...] = ()) -> None:
        self._special = THINK_MARKERS + special_tokens
        self._text: dict[int, str] = {i + 1: marker for i, marker in enumerate(self._special)}
        self._ids = {text: i for i, text in self._text.items()}

    def get_vocab(self) -> dict[str, int]:
        return {marker: self._ids[marker] for marker in self._special}

    def id_of(self, piece: str) -> int:
        """The token id of ``piece``, made up on first sight."""
        if piece not in self._ids:
            self._ids[piece] = token_id = 40_000 + len(self._ids)  # apart from the counting answer's
            self._text[token_id] = piece
        return self._ids[piece]

    def tokens(self, text: str) -> list[tuple[str, int]]:
        """``text`` as (piece, id) tokens: each marker one, the rest a few characters each."""
        pieces = []
        for part in _MARKERS.split(text):
            if part in THINK_MARKERS:
                pieces.append(part)
            else:
                pieces += [part[i:i + REPLY_CHARS_PER_TOKEN] for i in range(0, len(part), REPLY_CHARS_PER_TOKEN)]
        return [(piece, self.id_of(piece)) for piece in pieces]

    def decode(self, token_ids: list[int], **_: Any) -> str:
        return "".join(self._text.get(i, "") for i in token_ids)


class FakeEngine:
    def __init__(
        self, *, max_model_len: int = 2048, max_num_seqs: int = 64, answer_tokens: int = 16, step_s: float = 0.0,
        reply: str | None = None, stepwise: bool = False, embedding: bool = False, chat_template: str = "",
        vision: bool = False, special_tokens: tuple[str, ...] = (), prefill_s_per_token: float = 0.0,
    ) -> None:
        self.tokenizer = FakeTokenizer(special_tokens)  # special_tokens: e.g. fill-in-the-middle markers
        self.embedding = embedding
        self.vision = vision
        self.reasoning_parser = reasoning_parser_for(chat_template)
        self.last_images: list[Any] = []  # the latest generation's images, as the engine got them
        self.chat_template = chat_template
        self.reply = reply
        self._reply_tokens = self.tokenizer.tokens(reply) if reply is not None else []
        # The latest chat's messages as a template reads them, and its tools.
        self.last_chat: tuple[list[dict[str, Any]], list[dict[str, Any]] | None] | None = None
        self.last_sampling: Sampling | None = None
        self.last_prompt: list[int] = []  # the latest generation's prompt token ids
        self._cached_blocks: set[int] = set()  # chained hashes of every prompt block seen
        # Time to compute a prompt token not in the prefix cache (0: none), for routing benchmarks.
        self.prefill_s_per_token = prefill_s_per_token
        self._prefilling = asyncio.Lock()
        self.prefix_cache_queries = self.prefix_cache_hits = 0
        self.last_template_kwargs: dict[str, Any] = {}
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.vocab_size = VOCAB_SIZE
        self.answer_tokens = answer_tokens
        self.step_s = step_s
        self.aborted: list[str] = []
        self.started: list[str] = []
        self._in_flight: set[str] = set()
        self._dead = False
        self._steps = _Stepper(step_s, max_num_seqs) if stepwise else None

    def encode_chat(self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        self.last_chat = ([m.for_template() for m in messages], tools)
        self.last_template_kwargs = template_kwargs or {}
        text = "".join(f"<{m.role}>{m.content}" for m in messages) + "<assistant>"
        return [ord(c) % VOCAB_SIZE for c in text]

    def encode_raw(self, text: str) -> list[int]:
        return [ord(c) % VOCAB_SIZE for c in text]

    def encode_inputs(self, texts: list[str], truncate_to: int | None) -> list[list[int]]:
        return [self.encode_raw(text)[:truncate_to] for text in texts]

    async def embed(self, request_id: str, prompts: list[list[int]], priority: int = 0) -> Any:
        self.started.append(request_id)
        self._in_flight.add(request_id)
        try:
            await asyncio.sleep(self.step_s)
            self._check_alive()
            return fake_vectors(prompts)
        except asyncio.CancelledError:
            self.aborted.append(request_id)
            raise
        finally:
            self._in_flight.discard(request_id)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling, max_tokens: int, priority: int = 0,
        images: list[Any] | None = None, thinking: dict[str, Any] | None = None,
    ) -> AsyncIterator[Delta]:
        self.started.append(request_id)
        self.last_prompt = list(prompt_token_ids)
        uncached = self._look_up_prefix(self.last_prompt)
        if self.prefill_s_per_token:  # one prefill at a time, as one engine computes them
            async with self._prefilling:
                await asyncio.sleep(uncached * self.prefill_s_per_token)
        self.last_sampling = sampling
        self.last_images = list(images or [])
        self._in_flight.add(request_id)
        size = self.answer_tokens if self.reply is None else len(self._reply_tokens)
        n = min(size, max_tokens)
        # The counting answer says "length" also when max_tokens is exactly its size.
        finish = "length" if max_tokens < size + (self.reply is None) else "stop"
        label = self._label(prompt_token_ids)
        try:
            if self._steps is None:
                for i in range(n):
                    await asyncio.sleep(self.step_s)
                    self._check_alive()
                    yield self._delta(label, i, i + 1, n, finish, sampling)
            else:
                done = 0
                async for produced in self._steps.run(request_id, n):
                    self._check_alive()
                    yield self._delta(label, done, produced, n, finish, sampling)
                    done = produced
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise
        finally:
            self._in_flight.discard(request_id)

    def _check_alive(self) -> None:
        if self._dead:
            raise RuntimeError("the fake engine's process died")

    def _delta(self, label: str, start: int, end: int, n: int, finish: str, sampling: Sampling) -> Delta:
        """Tokens ``start`` to ``end`` (excluded) of an answer of ``n``, as one output."""
        tokens = [self._token(label, i) for i in range(start, end)]
        logprobs = None
        if sampling.logprobs is not None:
            logprobs = [lp for piece, _ in tokens for lp in _logprobs(piece, sampling.logprobs)]
        return Delta(text="".join(piece for piece, _ in tokens), num_tokens=end - start,
                     token_ids=[token_id for _, token_id in tokens], finish_reason=finish if end == n else None,
                     logprobs=logprobs)

    @staticmethod
    def _label(prompt_token_ids: list[int]) -> str:
        match = _LABEL.search("".join(map(chr, prompt_token_ids)))
        return f"{match.group(1)}:" if match else "tok"

    def _token(self, label: str, i: int) -> tuple[str, int]:
        if self.reply is None:
            return f"{label}{i} ", 1000 + i
        return self._reply_tokens[i]

    def in_flight(self) -> int:
        return len(self._in_flight)

    def dead(self) -> bool:
        return self._dead

    def kill(self) -> None:
        """What a killed engine process looks like: every request fails, now and later."""
        self._dead = True

    def prefix_cache_stats(self) -> tuple[int, int]:
        return self.prefix_cache_queries, self.prefix_cache_hits

    def _look_up_prefix(self, prompt: list[int]) -> int:
        """As vLLM's prefix cache counts: the prompt's whole blocks are looked up, and a hit
        is the run of blocks from its start that an earlier prompt had (this engine forgets
        nothing). Returns how many of its tokens were not found (the prefill to do)."""
        blocks = len(prompt) // PREFIX_BLOCK
        self.prefix_cache_queries += len(prompt)
        found, chain = 0, ()
        for i in range(blocks):
            chain = hash((chain, tuple(prompt[i * PREFIX_BLOCK:(i + 1) * PREFIX_BLOCK])))
            if chain in self._cached_blocks and found == i:
                found += 1
            self._cached_blocks.add(chain)
        self.prefix_cache_hits += found * PREFIX_BLOCK
        return len(prompt) - found * PREFIX_BLOCK

    def scheduler_stats(self) -> tuple[int, int, float]:
        if self._steps is not None:
            return self._steps.running, self._steps.waiting, 0.0
        return len(self._in_flight), 0, 0.0

    def close(self) -> None:
        pass


def fake_vectors(prompts: list[list[int]]) -> Any:
    """The fake model's vectors: made from each prompt's tokens and its length."""
    import numpy as np

    vectors = np.zeros((len(prompts), EMBED_DIM), dtype=np.float32)
    for row, ids in zip(vectors, prompts):
        row[0] = len(ids)
        for i, token in enumerate(ids):
            row[1 + (i + token) % (EMBED_DIM - 1)] += token % 7 - 3
    return vectors


def _logprobs(piece: str, top: int | None) -> list[TokenLogprob] | None:
    """The piece was the likeliest token (-0.25); ``alt1``, ``alt2``, ... came next."""
    if top is None:
        return None
    alternatives = [TopLogprob(token=piece, logprob=-0.25)] + \
        [TopLogprob(token=f"alt{j}", logprob=-1.0 - j) for j in range(1, top)]
    return [TokenLogprob(token=piece, logprob=-0.25, top=alternatives[:top])]


class _Request:
    __slots__ = ("size", "produced", "wake")

    def __init__(self, size: int) -> None:
        self.size = size
        self.produced = 0  # tokens made by the steps so far
        self.wake = asyncio.Event()


class _Stepper:
    """The stepwise pace: one step every ``step_s`` for up to ``max_num_seqs`` requests.

    The steps keep their cadence by the clock: when the event loop was busy past a step's
    time, the steps missed are made up at once (a GPU does not wait for its worker), and
    requests that had not taken their tokens get them all in one output. The step task runs
    only while there are requests."""

    def __init__(self, step_s: float, max_num_seqs: int) -> None:
        self.step_s = step_s
        self.max_num_seqs = max_num_seqs
        self._requests: dict[str, _Request] = {}  # in arrival order; the first max_num_seqs run
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> int:
        return min(len(self._requests), self.max_num_seqs)

    @property
    def waiting(self) -> int:
        return max(0, len(self._requests) - self.max_num_seqs)

    async def run(self, request_id: str, size: int) -> AsyncIterator[int]:
        """How many tokens of the request exist, each time more do, until ``size``."""
        request = self._requests[request_id] = _Request(size)
        if self._task is None:
            self._task = asyncio.create_task(self._step(), name="fake-engine-steps")
        try:
            while request.produced < size:
                await request.wake.wait()
                request.wake.clear()
                yield request.produced
        finally:
            self._requests.pop(request_id, None)

    async def _step(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        steps = 0
        try:
            while self._requests:
                steps += 1
                await asyncio.sleep(max(0.0, started + steps * self.step_s - loop.time()))
                due = int((loop.time() - started) / self.step_s) - steps + 1  # missed ones too
                steps += due - 1
                for request in list(self._requests.values())[:self.max_num_seqs]:
                    if request.produced < request.size:
                        request.produced = min(request.size, request.produced + due)
                        request.wake.set()
        finally:
            self._task = None
