"""The generation job: one arq job is one engine request, streamed back as frames.

A worker runs up to ``max_jobs`` of these at once on one engine, which batches them
continuously. Frames go to the job's pub/sub channel in order, each with the next sequence
number; the final answer is also returned for arq to store as the job's result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from common import batch_lines, clock, keys, ollama_templates
from common.batch_lines import LineError, LineOutcome
from common.errors import BadRequest, ErrorCode, PromptTooLong, Unavailable, VllamaError, from_code
from common.fim import fim_format
from common.go_template import Template, TemplateError
from common.images import open_image
from common.job_queue import keep_no_result, record_ttl
from common.metrics import ModelStats
from common.protocol import (
    ChatMessage,
    DoneFrame,
    EmbeddingsFrame,
    ErrorFrame,
    GenerationJob,
    JobResult,
    StartFrame,
    Stats,
    TokenLogprob,
    ToolCallsFrame,
)
from common.records import JobRecord, JobStatus
from common.redact import without_paths
from common.tasks import until_redis_answers
from common.thinking import takes_levels, template_kwargs
from common.vectors import runs_of
from workers import embedding
from workers.engine import Engine
from workers.frames import FrameLog, FramePublisher, FrameSink, Write
from workers.context_window import cut, fitting_messages, keep_count
from workers.reasoning import ThinkingSplitter
from workers.tool_parsing import ToolCallSplitter

log = logging.getLogger(__name__)
BATCH_PRIORITY = 1  # vLLM serves smaller numbers first


# Prompts up to this long are tokenized on the event loop: that takes well under a
# millisecond, less than the hand-over to a thread and back, which at hundreds of jobs a
# second costs more than it saves. Longer ones go to a thread (a long chat can take seconds).
INLINE_PROMPT_CHARS = 4096


def _images_of(job: GenerationJob) -> list[str]:
    """A job's images (base64), in the order its prompt places them."""
    return job.images if job.kind == "generate" else [image for m in job.messages for image in m.images]


def _quick_to_tokenize(job: GenerationJob) -> bool:
    """A short prompt without tools (whose schemas a chat template renders at length)."""
    size = len(job.prompt) + len(job.suffix or "") + len(job.system or "") + len(job.context) + \
        sum(len(m.content) + len(m.thinking) for m in job.messages)
    return job.tool_use is None and size <= INLINE_PROMPT_CHARS


class ClientGone(Exception):
    """Nobody listens to the job's channel any more: the API or its client went away."""


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


class GenerationRunner:
    """Runs generation jobs on one engine; shared by all of a worker's concurrent jobs."""

    def __init__(self, engine: Engine, redis: Redis, sink: FrameSink, worker_id: str, keep_result_s: int,
                 load_window: tuple[float, float] = (0.0, 0.0),
                 on_engine_dead: Callable[[], None] = lambda: None) -> None:
        self.engine = engine
        self.on_engine_dead = on_engine_dead  # stops the job consumers at once
        self.redis = redis
        self.sink = sink
        self.worker_id = worker_id
        self.keep_result_s = keep_result_s
        self.load_window = load_window  # (start, end) of the model's load, wall clock
        self.running: set[str] = set()
        self._started_at: dict[str, float] = {}  # job id -> when it started here
        self.stats = ModelStats()  # for /metrics, through the heartbeat
        # Whether (and how) the model thinks, as its chat template says (common/thinking.py).
        self.reasoning_parser = None if engine.embedding else engine.reasoning_parser
        self.think_levels = takes_levels(engine.chat_template)
        # Whether it can fill in the middle (Ollama's suffix), as its vocabulary says.
        self.fim = None if engine.embedding else fim_format(engine.tokenizer.get_vocab())

    def load_duration(self, job: GenerationJob) -> float:
        """How long this job waited for its model to load (Ollama's load_duration)."""
        started, ended = self.load_window
        return max(0.0, ended - max(started, job.created_at))

    async def run(self, ctx: dict, spec: dict) -> dict | None:
        job = GenerationJob.model_validate(spec)
        # An async job's frames are kept, for the jobs API to show and replay; a streamed
        # job's answer went to its client in frames, so arq keeps no result of it either.
        keep = None if job.stream else FrameLog(job.job_id, self.keep_result_s)
        if job.stream:
            keep_no_result(ctx)
        publisher = FramePublisher(self.sink, job.job_id, job.reply_to, keep)
        self.running.add(job.job_id)
        try:
            if await self._start(job, publisher) == 0 and job.stream:
                raise ClientGone
            if self.engine.dead():
                self.on_engine_dead()
                raise Unavailable(f"the engine of worker {self.worker_id} stopped working; retry the request "
                                  "(other workers serve it meanwhile)")
            result = await (self._embed(job, publisher) if job.kind == "embed" else self._generate(job, publisher))
        except ClientGone:
            log.info("job %s: no listener left, stopped", job.job_id)
            # Shielded: the abort its client's API sends as it leaves may cancel this task
            # now, and without its end the job would stay "running" in vllama:running.
            await asyncio.shield(self._record(job, "cancelled", error="the client went away"))
            raise asyncio.CancelledError from None
        except asyncio.CancelledError:
            await asyncio.shield(self._record(job, "cancelled", error="cancelled"))
            raise
        except VllamaError as exc:
            await self._fail(job, publisher, exc.code, exc.message)
            raise
        except Exception as exc:  # noqa: BLE001 - any engine failure must reach the client
            log.exception("job %s failed", job.job_id)
            await self._fail(job, publisher, ErrorCode.INTERNAL, f"generation failed: {without_paths(str(exc))}")
            raise
        finally:
            self.running.discard(job.job_id)
        await asyncio.shield(self._record(job, "done", result=result))
        # A streamed job's answer went to its client in frames: arq keeps nothing of it.
        return None if job.stream else result.model_dump(mode="json")

    async def _start(self, job: GenerationJob, publisher: FramePublisher) -> int:
        """Record the job as running and tell its listener who runs it, in the frame sink's
        next round trip, shared with the other jobs starting or streaming now (time to first
        token). Returns how many API processes the start frame reached (1 for an async job)."""
        self._started_at[job.job_id] = started_at = clock.now()
        self.stats.queue_wait.observe(max(0.0, started_at - job.created_at))
        record = JobRecord.of(job, "running", worker_id=self.worker_id, started_at=started_at).dump()

        def running(pipe: Any) -> None:
            pipe.set(keys.job_record(job.job_id), record, ex=self.keep_result_s)
            if publisher.keep is not None:
                pipe.delete(publisher.keep.key)  # frames of an earlier attempt, if any, are void

        self.sink.write(running)
        listeners = await publisher.send(StartFrame, worker_id=self.worker_id)
        return listeners.get(publisher.channel, 1)

    def window(self, job: GenerationJob) -> int:
        """The job's context window: its num_ctx, at most the model's."""
        model_max = self.engine.max_model_len
        return min(job.sampling.num_ctx or model_max, model_max)

    def prompt_tokens(self, job: GenerationJob) -> tuple[list[int], list[str]]:
        """The job's prompt as token ids, fitted into its window (workers/context_window.py),
        and the images (base64) of what was kept. Called in a thread for a long prompt:
        rendering and tokenizing one takes seconds, during which the event loop must go on
        serving the other jobs."""
        self.check_context(job)
        window = self.window(job)
        if job.suffix is not None and not job.raw:  # raw: the text as is, as Ollama does
            tokens = list(job.context) + self.engine.encode_raw(self._fill_in_text(job))
            return self._cut_to_fit(job, tokens, window, job.images), job.images
        if job.raw:
            return self._cut_to_fit(job, self.engine.encode_raw(job.prompt), window, job.images), job.images
        if job.kind == "chat":
            messages = job.messages
        else:
            messages = [ChatMessage(role="system", content=job.system)] if job.system else []
            messages.append(ChatMessage(role="user", content=job.prompt, images=job.images))
        context = list(job.context)
        tools = job.tool_use.tools if job.tool_use else None
        if job.template is not None:  # an Ollama template: its text is the prompt, as is
            template = self._ollama_template(job)
            if any(m.images for m in messages):
                raise BadRequest("a custom template cannot place images in the prompt; leave template out to use "
                                 "the model's own")

            def encode(messages: list[ChatMessage]) -> list[int]:
                try:
                    text = ollama_templates.render(template, messages, tools, job.think)
                except TemplateError as exc:
                    raise BadRequest(str(exc)) from None
                return context + self.engine.encode_raw(text)
        else:
            thinking = template_kwargs(job.think, self.think_levels) if self.reasoning_parser else {}

            def encode(messages: list[ChatMessage]) -> list[int]:
                return context + self.engine.encode_chat(messages, tools, thinking)

        tokens = encode(messages)
        if len(tokens) >= window and job.truncate and len(messages) > 1:
            messages = fitting_messages(messages, lambda m: m.role == "system", lambda ms: len(encode(ms)) < window)
            tokens = encode(messages)
        images = [image for m in messages for image in m.images]
        return self._cut_to_fit(job, tokens, window, images), images

    @staticmethod
    def _ollama_template(job: GenerationJob) -> Template:
        try:
            return ollama_templates.compile_template(job.template)
        except TemplateError as exc:  # checked by the API, but a model's may come from anywhere
            raise BadRequest(str(exc)) from None

    def _fill_in_text(self, job: GenerationJob) -> str:
        """The fill-in-the-middle prompt: the request's (or model's) Ollama template's if it
        reads ``.Suffix``, else in the format of the model's vocabulary (common/fim.py)."""
        if job.template is not None:
            text = ollama_templates.render_fill_in(self._ollama_template(job), job.prompt, job.suffix)
            if text is not None:
                return text
        return self.fim.prompt(job.prompt, job.suffix)

    def _can_fill_in(self, job: GenerationJob) -> bool:
        return self.fim is not None or (
            job.template is not None and "suffix" in self._ollama_template(job).identifiers)

    def _cut_to_fit(self, job: GenerationJob, tokens: list[int], window: int, images: list[str]) -> list[int]:
        """``tokens``, cut by tokens if they leave no room to answer and the job allows it."""
        if len(tokens) < window:
            return tokens
        model_max = self.engine.max_model_len
        too_long = f"the prompt is {len(tokens)} tokens but the context length is {window}"
        if not job.truncate:  # Ollama's words first: clients look for them
            raise PromptTooLong(f"the input length exceeds the context length: {too_long}; shorten the prompt or "
                                f"raise options.num_ctx (this model allows up to {model_max})")
        if images:  # an image's tokens cannot be cut in half
            raise PromptTooLong(f"{too_long}, and a prompt with images cannot be cut to fit; shorten it or raise "
                                f"options.num_ctx (this model allows up to {model_max})")
        return cut(tokens, keep_count(job.sampling.num_keep, len(tokens), window), window)

    def check_context(self, job: GenerationJob) -> None:
        """Token ids from the client (an earlier answer's context) must be in this model's
        vocabulary: the API cannot know it, and the engine must never see one that is not."""
        vocab = self.engine.vocab_size
        for i, token in enumerate(job.context):
            if not 0 <= token < vocab:
                raise BadRequest(f"context[{i}] is {token}, which is not a token of {job.model} (its vocabulary "
                                 f"has {vocab}); send back the context of an earlier answer of this model "
                                 "unchanged, or leave it out")

    def _check_capability(self, job: GenerationJob) -> None:
        """Ollama's 400 for a generation asked of an embedding model, or the reverse, for
        thinking asked of a model that does not think, and for images it cannot see."""
        what = None
        if self.engine.embedding != (job.kind == "embed"):
            what = "embeddings" if job.kind == "embed" else job.kind
        elif job.think not in (None, False) and self.reasoning_parser is None:
            what = "thinking"
        elif job.suffix is not None and not self._can_fill_in(job):
            what = "insert"
        elif _images_of(job) and not self.engine.vision:
            what = "vision"
        if what is not None:
            raise BadRequest(f'"{job.model.removesuffix(":latest")}" does not support {what}')

    def _thinking_splitter(self, job: GenerationJob, prompt: list[int]) -> ThinkingSplitter | None:
        """What keeps the reasoning apart from the answer, for a model that thinks (a raw
        prompt has no template to think by)."""
        if self.reasoning_parser is None or job.raw or job.suffix is not None:
            return None
        try:
            return ThinkingSplitter(self.reasoning_parser, job.think, self.think_levels, self.engine.tokenizer, prompt)
        except Exception:  # noqa: BLE001 - e.g. markers missing from the vocabulary: answer as a plain model
            log.warning("the %s reasoning parser does not fit %s; its answers are not split", self.reasoning_parser,
                        job.model, exc_info=True)
            self.reasoning_parser = None
            return None

    async def _embed(self, job: GenerationJob, publisher: FramePublisher) -> JobResult:
        self._check_capability(job)
        started = time.monotonic()
        spec = job.embed
        if sum(map(len, spec.texts)) <= INLINE_PROMPT_CHARS:
            prompts = embedding.prompts_of(self.engine, spec, job.model)
        else:  # a thousand inputs take a while to tokenize: not on the event loop
            prompts = await asyncio.to_thread(embedding.prompts_of, self.engine, spec, job.model)
        runs = []
        if prompts:
            vectors = embedding.shaped(await self.engine.embed(job.job_id, prompts, self._priority(job)), spec)
            runs = list(runs_of(vectors))
            for run in runs:  # not awaited: they go in one round trip with the done frame
                publisher.send(EmbeddingsFrame, **run.model_dump())
        ended = time.monotonic()
        stats = Stats(total_duration=_ns(clock.now() - job.created_at), load_duration=_ns(self.load_duration(job)),
                      prompt_eval_count=sum(map(len, prompts)), prompt_eval_duration=_ns(ended - started),
                      eval_count=0, eval_duration=0)
        await publisher.send(DoneFrame, done_reason="stop", stats=stats)
        # Kept whole only for a job nobody streams (a batch line's outcome).
        return JobResult(text="", done_reason="stop", stats=stats, vectors=[] if job.stream else runs)

    @staticmethod
    def _shifts(job: GenerationJob, images: list) -> bool:
        """Whether an answer that fills the window goes on past it (Ollama's context shift):
        only up to a num_predict the request set, and not where the cut would break what
        follows (images' tokens, a JSON structure under way)."""
        sampling = job.sampling
        return job.shift and sampling.max_tokens is not None and not images and \
            sampling.json_schema is None and not sampling.json_object

    @staticmethod
    def _priority(job: GenerationJob) -> int:
        return BATCH_PRIORITY if job.priority == "batch" else 0

    async def _generate(self, job: GenerationJob, publisher: FramePublisher) -> JobResult:
        self._check_capability(job)
        started = time.monotonic()
        if _quick_to_tokenize(job):
            prompt, images = self.prompt_tokens(job)
        else:
            prompt, images = await asyncio.to_thread(self.prompt_tokens, job)
        if images:  # decoding takes a while for big ones: not on the event loop
            images = await asyncio.to_thread(lambda: [open_image(image, i) for i, image in enumerate(images)])
        prompt_count = len(prompt)
        window = self.window(job)

        parts: list[str] = []
        thoughts: list[str] = []
        output_ids: list[int] = []
        first_token_at: float | None = None
        finish = "length"
        stop_sequence: str | None = None
        thinker = self._thinking_splitter(job, prompt)
        splitter = ToolCallSplitter(job.tool_use, self.engine.tokenizer) if job.tool_use else None
        sampling = job.sampling
        if any(s is not None and not s.skip_special_tokens for s in (thinker, splitter)):
            sampling = sampling.model_copy(update={"skip_special_tokens": False})

        logprobs: list[TokenLogprob] | None = [] if job.sampling.logprobs is not None else None

        def still_listened() -> None:
            # Known from an earlier publish: the API process that asked for it has gone.
            if job.stream and not publisher.listening():
                raise ClientGone

        def send(text: str, token_logprobs: list[TokenLogprob] | None = None) -> None:
            parts.append(text)
            if token_logprobs:
                logprobs.extend(token_logprobs)
            still_listened()
            publisher.token(text, token_logprobs)

        def think(text: str) -> None:
            thoughts.append(text)
            still_listened()
            publisher.thinking(text)

        thinking = template_kwargs(job.think, self.think_levels) if thinker is not None else None
        wanted = job.sampling.max_tokens  # None: until the window is full
        engine_prompt, part = prompt, 0
        while True:
            room = window - len(engine_prompt)
            max_tokens = room if wanted is None else min(wanted - len(output_ids), room)
            if max_tokens <= 0:
                break
            # Each shift is a new engine request, with an id of its own.
            request_id = job.job_id if part == 0 else f"{job.job_id}-shift{part}"
            before = len(output_ids)
            async for delta in self.engine.generate(request_id, engine_prompt, sampling, max_tokens,
                                                    self._priority(job), images=images, thinking=thinking):
                if delta.prompt_tokens is not None:  # each image's tokens count as prompt tokens
                    prompt_count = delta.prompt_tokens
                if first_token_at is None:
                    first_token_at = time.monotonic()
                    # From the request's arrival: the time in the queue is part of the wait.
                    self.stats.ttft.observe(max(0.0, clock.now() - job.created_at))
                output_ids.extend(delta.token_ids)
                text, token_ids = delta.text, delta.token_ids
                if thinker is not None:
                    reasoning, text, token_ids = thinker.feed(text, token_ids)
                    if reasoning:
                        think(reasoning)
                if splitter is not None:
                    text = splitter.feed(text, token_ids)
                if text or delta.logprobs:
                    send(text, delta.logprobs)
                if delta.finish_reason is not None:
                    finish = "stop" if delta.finish_reason == "stop" else "length"
                    stop_sequence = delta.stop_sequence
            if finish != "length" or len(output_ids) - before < max_tokens or not self._shifts(job, images):
                break
            # The answer filled the window short of num_predict: go on from the cut tokens.
            keep = keep_count(job.sampling.num_keep, len(prompt), window)
            engine_prompt, part = cut(engine_prompt + output_ids[before:], keep, window), part + 1
        calls = []
        if splitter is not None:
            rest, calls = splitter.finish()
            if rest:
                send(rest)
            if calls:
                await publisher.send(ToolCallsFrame, calls=calls)
        ended = time.monotonic()
        first_token_at = first_token_at or ended
        stats = Stats(
            total_duration=_ns(clock.now() - job.created_at),
            load_duration=_ns(self.load_duration(job)),
            prompt_eval_count=prompt_count,
            prompt_eval_duration=_ns(first_token_at - started),
            eval_count=len(output_ids),
            eval_duration=_ns(ended - first_token_at),
        )
        context = prompt + output_ids if job.kind == "generate" and not job.raw else None
        await publisher.send(DoneFrame, done_reason=finish, stats=stats, context=context, stop_sequence=stop_sequence)
        return JobResult(text="".join(parts), thinking="".join(thoughts), done_reason=finish, stats=stats,
                         context=context, tool_calls=calls, logprobs=logprobs)

    async def _fail(self, job: GenerationJob, publisher: FramePublisher, code: str, message: str) -> None:
        await asyncio.shield(publisher.send(ErrorFrame, code=code, message=message))
        await asyncio.shield(self._record(job, "failed", error=message, code=code))

    def _count(self, status: str, result: JobResult | None) -> None:
        self.stats.ended(status)
        if result is not None:
            counts = result.stats
            self.stats.prompt_tokens += counts.prompt_eval_count
            self.stats.generated_tokens += counts.eval_count
            if counts.eval_count > 1:
                self.stats.tpot.observe(counts.eval_duration / 1e9 / (counts.eval_count - 1))

    def _end_writes(self, job_id: str, record: JobRecord, result: JobResult | None) -> Write:
        def end(pipe: Any) -> None:
            # A streamed job's record is kept only briefly once it ended (record_ttl), also
            # when this write is sent again after Redis lost its data: never for an hour.
            pipe.set(keys.job_record(job_id), record.dump(), ex=record_ttl(record, self.keep_result_s))
            if record.owner is not None and result is not None:  # usage per API key, in /metrics
                pipe.hincrby(keys.KEY_PROMPT_TOKENS, record.owner, result.stats.prompt_eval_count)
                pipe.hincrby(keys.KEY_GENERATED_TOKENS, record.owner, result.stats.eval_count)

        return end

    async def _record(self, job: GenerationJob, status: JobStatus, *, error: str | None = None,
                      code: str = ErrorCode.CANCELLED, result: JobResult | None = None) -> None:
        """The job's final record (every caller ends the job), and for a batch line its outcome."""
        self._count(status, result)
        record = JobRecord.of(job, status, worker_id=self.worker_id, started_at=self._started_at.pop(job.job_id, None),
                              error=error)
        # With the frames (the sink sends its batches again until Redis takes them).
        await self.sink.write(self._end_writes(job.job_id, record, result))
        if job.batch is not None:
            line_error = None if error is None else LineError(status=from_code(code, error).status, code=code,
                                                              message=error)
            outcome = LineOutcome(status=status, job_id=job.job_id, result=result, error=line_error)
            await until_redis_answers(lambda: batch_lines.record(self.redis, job.batch, outcome),
                                      f"batch outcome of job {job.job_id}")
