"""What crosses Redis: job specs (API -> worker) and frames (worker -> API).

Both are JSON (pydantic), never pickle, so ``redis-cli`` shows them as text and a shared Redis
cannot be used to run code in a worker. The API resolves every default before building a
``GenerationJob`` ("parse, then trust"): workers never see an HTTP body.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from common import clock
from common.thinking import Think
from common.tool_calls import ToolCall, ToolUse


class Sampling(BaseModel):
    """Sampling settings with Ollama's defaults already applied (see api/ollama_models.py)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    max_tokens: int | None = None  # None: until the context is full (Ollama's num_predict -1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    num_ctx: int | None = None  # per-request context window; None: the model's own
    num_keep: int | None = None  # tokens at the start kept when a prompt is cut to fit; -1: all; None: 4
    json_schema: dict[str, Any] | None = None  # structured output: a JSON schema...
    json_object: bool = False  # ...or any JSON object (Ollama's format "json")
    skip_special_tokens: bool = True  # False when a tool parser must see special tokens (set by the worker)
    logprobs: int | None = None  # per token: its log probability and this many top alternatives; None: off
    # The fields the request itself set (not sent: the API applies the model's defaults to the
    # others before queueing, common/model_defaults.py).
    _given: set[str] = PrivateAttr(default_factory=set)

    @property
    def given(self) -> set[str]:
        return self._given


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str = ""  # assistant: its reasoning before the answer
    images: list[str] = Field(default_factory=list)  # base64, checked by the API (common/images.py)
    tool_calls: list[ToolCall] = Field(default_factory=list)  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this answers (OpenAI)
    tool_name: str | None = None  # tool: the function that answered (Ollama)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (Hugging Face's convention)."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.images:  # as vision models' templates take them: a placeholder per image, then the text
            message["content"] = [{"type": "image"} for _ in self.images] + [{"type": "text", "text": self.content}]
        if self.thinking:
            message["reasoning_content"] = self.thinking  # what Qwen3's and kin's templates read
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_name is not None:
            message["name"] = self.tool_name
        return message


class BatchRef(BaseModel):
    """Which line of an OpenAI batch a job runs (common/batch_lines.py)."""

    batch_id: str
    index: int
    ttl_s: int  # how long the batch's keys live


class EmbedInput(BaseModel):
    """The inputs of an embedding job: texts, or token ids (OpenAI's token arrays)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(default_factory=list)
    token_ids: list[list[int]] = Field(default_factory=list)
    truncate: bool = True  # an input longer than the context is cut to fit; False: 400
    dimensions: int | None = None  # keep the first this many numbers of each vector
    normalize: bool = True  # L2-normalize (after cutting to ``dimensions``)


class JobRoute(BaseModel):
    """Which worker a job was routed to, and why (api/routing.py): it alone may take the job
    until ``until_ms``; then any worker may."""

    worker_id: str
    reason: Literal["balance", "affinity"]
    prefix_chars: int = 0  # affinity: how much of the prompt that worker ran before
    until_ms: int = 0


class GenerationJob(BaseModel):
    """One generation request as the worker runs it."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    model: str
    kind: Literal["generate", "chat", "embed"]
    prompt: str = ""  # generate: user prompt (or the whole text when raw)
    suffix: str | None = None  # generate: what follows the text to write (fill-in-the-middle, common/fim.py)
    template: str | None = None  # an Ollama (Go) template instead of the model's chat template
    system: str | None = None  # generate: system message
    raw: bool = False  # generate: no chat template
    context: list[int] = Field(default_factory=list)  # generate: tokens from an earlier answer
    images: list[str] = Field(default_factory=list)  # generate: base64, with the prompt
    messages: list[ChatMessage] = Field(default_factory=list)  # chat
    tool_use: ToolUse | None = None  # chat: the tools the model may call
    think: Think = None  # whether to think, or how hard (common/thinking.py); None: the model's default
    # A prompt longer than the window loses its oldest messages, then tokens (Ollama's default,
    # workers/context_window.py); False: 400, as OpenAI's and Anthropic's APIs answer.
    truncate: bool = False
    shift: bool = False  # an answer that fills the window goes on past it, up to max_tokens
    embed: EmbedInput | None = None  # embed: what to embed, and how
    sampling: Sampling = Field(default_factory=Sampling)
    # False for async jobs: they run whether or not anyone listens, and their frames are also
    # kept in vllama:job-frames:<id> for the jobs API.
    stream: bool = True
    # A streamed job's frames go, bundled with those of the other jobs of the same API process,
    # to that process's reply channel (keys.reply_channel); None: to the job's own channel.
    reply_to: str | None = None
    priority: Literal["interactive", "batch"] = "interactive"  # batch: served after interactive work
    batch: BatchRef | None = None  # a line of an OpenAI batch: its outcome is recorded there
    owner: str | None = None  # the name of the API key that made it (None: no keys configured)
    route: JobRoute | None = None  # the worker it was routed to (None: whichever takes it first)
    created_at: float = Field(default_factory=clock.now)


# ---------------------------------------------------------------- frames


class _Frame(BaseModel):
    seq: int  # 0, 1, 2, ... per job; the API fails loudly on a gap


class StartFrame(_Frame):
    """A worker took the job; the API watches this worker's heartbeat from now on."""

    type: Literal["start"] = "start"
    worker_id: str


class TopLogprob(BaseModel):
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    """One generated token's log probability, and the most likely tokens at its place."""

    token: str
    logprob: float
    top: list[TopLogprob] = Field(default_factory=list)


class TokenFrame(_Frame):
    type: Literal["token"] = "token"
    text: str
    logprobs: list[TokenLogprob] | None = None  # the tokens of this piece, when asked for


class ThinkingFrame(_Frame):
    """A piece of the model's reasoning, kept apart from the answer."""

    type: Literal["thinking"] = "thinking"
    text: str


class Stats(BaseModel):
    """Ollama's final counters; durations in nanoseconds."""

    total_duration: int
    load_duration: int = 0
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int


class DoneFrame(_Frame):
    type: Literal["done"] = "done"
    done_reason: Literal["stop", "length"]
    stats: Stats
    context: list[int] | None = None  # generate without raw: prompt + answer tokens
    stop_sequence: str | None = None  # the request's stop string that ended the answer, if one did


class ToolCallsFrame(_Frame):
    """The calls the model made, each whole, once the answer is complete (before Done)."""

    type: Literal["tool_calls"] = "tool_calls"
    calls: list[ToolCall]


class Vectors(BaseModel):
    """Vectors of consecutive inputs, from input ``first`` on: ``count`` vectors of ``dim``
    float32 numbers, little-endian, base64: a quarter of the size of JSON numbers, and exact."""

    first: int
    count: int
    dim: int
    data: str


class EmbeddingsFrame(_Frame, Vectors):
    type: Literal["embeddings"] = "embeddings"


class ErrorFrame(_Frame):
    type: Literal["error"] = "error"
    code: str  # an ErrorCode value (common/errors.py)
    message: str


PullStatus = Literal["queued", "manifest", "downloading", "verifying", "converting", "writing", "success", "failed"]


class PullFile(BaseModel):
    path: str
    digest: str  # "sha256:<64 hex>"
    total: int
    completed: int = 0


class PullState(BaseModel):
    """Where one pull of a model into one store stands. Each pull frame carries the whole
    state, so a client that joins a running pull, or misses a frame, loses nothing."""

    model: str
    store_id: str
    status: PullStatus = "queued"
    files: list[PullFile] = Field(default_factory=list)
    error: str | None = None
    code: str | None = None  # ErrorCode of a failed pull
    updated_at: float = Field(default_factory=clock.now)

    @property
    def finished(self) -> bool:
        return self.status in ("success", "failed")


class PullFrame(_Frame):
    type: Literal["pull"] = "pull"
    state: PullState


# "manifest": reading the model's files (and hashing them); "uploading": their bytes going up;
# "committing": the one commit that makes them the repo's (Ollama's "pushing manifest").
PushStatus = Literal["queued", "manifest", "uploading", "committing", "success", "failed"]


class PushState(BaseModel):
    """Where one push of a model from one store to a Hugging Face repo stands (/api/push).
    Like a pull's, each push frame carries the whole state, so a missed frame loses nothing."""

    model: str
    store_id: str
    repo: str
    revision: str  # the branch committed to
    status: PushStatus = "queued"
    files: list[PullFile] = Field(default_factory=list)  # digest: the sha256 of the file's content
    commit: str | None = None  # the commit made, once it is
    error: str | None = None
    code: str | None = None  # ErrorCode of a failed push
    updated_at: float = Field(default_factory=clock.now)

    @property
    def finished(self) -> bool:
        return self.status in ("success", "failed")


class PushFrame(_Frame):
    type: Literal["push"] = "push"
    state: PushState


Frame = Annotated[StartFrame | TokenFrame | ThinkingFrame | ToolCallsFrame | EmbeddingsFrame | DoneFrame | ErrorFrame
                  | PullFrame | PushFrame, Field(discriminator="type")]


class JobResult(BaseModel):
    """What a worker returns for arq to store (arq:result:<id>): the whole answer."""

    text: str  # the content: tool calls the model wrote are in tool_calls, not here
    thinking: str = ""  # the reasoning, apart from the content
    done_reason: Literal["stop", "length"]
    stats: Stats
    context: list[int] | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    vectors: list[Vectors] = Field(default_factory=list)  # an embedding job's (a batch line's)
