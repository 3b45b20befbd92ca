"""OpenAI's request bodies for /v1/chat/completions and /v1/completions, and their
conversion to job specs ("parse, then trust"), with OpenAI's defaults (temperature 1,
top_p 1, no top_k, no length limit but the context)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.ollama_models import new_job_id
from common import clock
from common.errors import BadRequest
from common.models import canonical_name
from common.protocol import ChatMessage, GenerationJob, Sampling
from common.tool_calls import ToolCall


MAX_CHOICES = 128  # choices in one request (n times the prompts), as OpenAI allows


def fan_out(jobs: list[GenerationJob], n: int) -> list[GenerationJob]:
    """``n`` jobs per job, one per choice: choice ``i`` of prompt ``k`` is job ``k * n + i``.
    With a seed, choice i samples with seed + i, so the choices differ and are reproducible."""
    if len(jobs) * n > MAX_CHOICES:
        raise BadRequest(f"{len(jobs)} prompts times n={n} is more than {MAX_CHOICES} choices; send fewer")
    out = []
    for job in jobs:
        for i in range(n):
            sampling = job.sampling if job.sampling.seed is None or i == 0 else \
                job.sampling.model_copy(update={"seed": job.sampling.seed + i})
            out.append(job if i == 0 else job.model_copy(update={"job_id": new_job_id(), "sampling": sampling}))
    return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int | None = None
    user: str | None = None  # accepted and ignored, as vLLM does

    def canonical_model(self) -> str:
        if not self.model.strip():
            raise BadRequest("you must provide a model parameter")
        return canonical_name(self.model)

    def choices_per_prompt(self) -> int:
        n = 1 if self.n is None else self.n
        if not 1 <= n <= MAX_CHOICES:
            raise BadRequest(f"n must be between 1 and {MAX_CHOICES}")
        return n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_tokens: int | None) -> Sampling:
        s = Sampling(temperature=1.0, top_k=0, top_p=1.0)
        if self.temperature is not None:
            if not 0 <= self.temperature <= 2:
                raise BadRequest("temperature must be between 0 and 2")
            s.temperature = self.temperature
        if self.top_p is not None:
            if not 0 < self.top_p <= 1:
                raise BadRequest("top_p must be more than 0 and at most 1")
            s.top_p = self.top_p
        if max_tokens is not None:
            if max_tokens < 1:
                raise BadRequest("max_tokens must be at least 1")
            s.max_tokens = max_tokens
        if self.stop is not None:
            s.stop = [self.stop] if isinstance(self.stop, str) else [x for x in self.stop if x]
            if len(s.stop) > 4:
                raise BadRequest("stop takes at most 4 sequences")
        s.seed = self.seed
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None:
                if not -2 <= value <= 2:
                    raise BadRequest(f"{name} must be between -2 and 2")
                setattr(s, name, value)
        return s


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None

    def apply(self, s: Sampling) -> None:
        if self.type == "json_object":
            s.json_object = True
        elif self.type == "json_schema":
            schema = (self.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise BadRequest('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
            s.json_schema = schema


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str = "{}"  # JSON text in OpenAI's API


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def to_tool_call(self) -> ToolCall:
        try:
            arguments = json.loads(self.function.arguments or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise BadRequest(f"the arguments of tool call {self.id or self.function.name!r} must be a JSON "
                             f"object encoded as a string, not {self.function.arguments!r}")
        return ToolCall(name=self.function.name, arguments=arguments, **({"id": self.id} if self.id else {}))


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def to_chat_message(self) -> ChatMessage:
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=self.text(),
                           tool_calls=[c.to_tool_call() for c in self.tool_calls or []],
                           tool_call_id=self.tool_call_id, tool_name=self.name if self.role == "tool" else None)

    def text(self) -> str:
        """Plain text content; parts of type "text" are joined (images are not supported)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text":
                raise BadRequest(f"content parts of type {part.get('type')!r} are not supported; send text")
            texts.append(str(part.get("text", "")))
        return "".join(texts)


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessageIn] = Field(default_factory=list)
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def to_job(self) -> GenerationJob:
        if not self.messages:
            raise BadRequest("messages must contain at least one message")
        sampling = self._sampling(self.max_completion_tokens or self.max_tokens)
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= 20:
                raise BadRequest("top_logprobs must be between 0 and 20")
            if not self.logprobs:
                raise BadRequest("top_logprobs needs logprobs: true")
        if self.logprobs:
            sampling.logprobs = self.top_logprobs or 0
        if self.response_format is not None:
            self.response_format.apply(sampling)
        messages = [m.to_chat_message() for m in self.messages]
        return GenerationJob(job_id=new_job_id(), model=self.canonical_model(), kind="chat", messages=messages,
                             sampling=sampling, created_at=clock.now())


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] = ""
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None  # how many top tokens to list per token (the legacy API's form)

    def to_jobs(self) -> list[GenerationJob]:
        """One job per prompt."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise BadRequest("prompt must be a string or a non-empty list of strings")
        if self.echo or self.suffix:
            raise BadRequest("echo and suffix are not supported")
        sampling = self._sampling(self.max_tokens)
        if self.logprobs is not None:
            if not 0 <= self.logprobs <= 5:
                raise BadRequest("logprobs must be between 0 and 5")
            sampling.logprobs = self.logprobs
        # The text is continued as is: no chat template.
        return [GenerationJob(job_id=new_job_id(), model=self.canonical_model(), kind="generate", prompt=prompt,
                              raw=True, sampling=sampling.model_copy(), created_at=clock.now())
                for prompt in prompts]
