"""OpenAI's request bodies for /v1/chat/completions and /v1/completions, and their
conversion to job specs ("parse, then trust"), with OpenAI's defaults (temperature 1,
top_p 1, no top_k, no length limit but the context)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Literal

from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, field_validator

from api.bounds import INT32_MAX, MAX_OPENAI_STOPS, SEED_MAX, SEED_MIN, JsonObject, WireModel, check_int, check_seed, \
    hosted_sampling, stop_strings
from api.ollama_models import new_job_id
from common import clock
from common.errors import BadRequest
from common.images import checked as checked_image
from common.images import is_data_url
from common.model_defaults import mark_given
from common.models import canonical_name
from common.protocol import ChatMessage, GenerationJob, Sampling
from common.thinking import Think, openai_effort
from common.tool_calls import ToolCall

if TYPE_CHECKING:
    from api.limits import RequestLimits

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
                job.sampling.model_copy(update={"seed": _seed_plus(job.sampling.seed, i)})
            out.append(job if i == 0 else job.model_copy(update={"job_id": new_job_id(), "sampling": sampling}))
    return out


def _seed_plus(seed: int, i: int) -> int:
    """seed + i, wrapped within the 64-bit range the engine takes."""
    span = SEED_MAX - SEED_MIN + 1
    return (seed + i - SEED_MIN) % span + SEED_MIN


class StreamOptions(WireModel):
    include_usage: bool = False


class _OpenAIRequest(WireModel):
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

    def choices_per_prompt(self, limits: RequestLimits | None = None) -> int:
        """``n``; ``limits`` (from the settings) bound it."""
        n = 1 if self.n is None else self.n
        if n < 1:
            raise BadRequest("n must be at least 1")
        if limits is not None:
            limits.check_n(n)
        if n > MAX_CHOICES:
            raise BadRequest(f"n must be between 1 and {MAX_CHOICES}")
        return n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_tokens: int | None, max_tokens_field: str = "max_tokens") -> Sampling:
        s = hosted_sampling(self.temperature, self.top_p)
        if max_tokens is not None:
            if max_tokens < 1:
                raise BadRequest(f"{max_tokens_field} must be at least 1")
            check_int(max_tokens_field, max_tokens, 1, INT32_MAX)
            s.max_tokens = max_tokens
        s.stop = stop_strings("stop", self.stop, MAX_OPENAI_STOPS)
        check_seed("seed", self.seed)
        s.seed = self.seed
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None:
                if not -2 <= value <= 2:
                    raise BadRequest(f"{name} must be between -2 and 2")
                setattr(s, name, value)
        mark_given(s, self, {"temperature": "temperature", "top_p": "top_p", max_tokens_field: "max_tokens",
                             "stop": "stop", "seed": "seed", "presence_penalty": "presence_penalty",
                             "frequency_penalty": "frequency_penalty"})
        return s


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonObject | None = None

    def apply(self, s: Sampling) -> None:
        if self.type == "json_object":
            s.json_object = True
        elif self.type == "json_schema":
            schema = (self.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise BadRequest('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
            s.json_schema = schema


class FunctionCallIn(WireModel):
    name: str
    arguments: str = "{}"  # JSON text in OpenAI's API


class ToolCallIn(WireModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def to_tool_call(self) -> ToolCall:
        try:
            arguments = json.loads(self.function.arguments or "{}", parse_constant=_no_constant)
        except (ValueError, RecursionError):
            arguments = None
        if not isinstance(arguments, dict):
            shown = self.function.arguments if len(self.function.arguments) <= 40 else \
                self.function.arguments[:37] + "..."
            raise BadRequest(f"the arguments of tool call {self.id or self.function.name!r} must be a JSON "
                             f"object encoded as a string, not {shown!r}")
        return ToolCall(name=self.function.name, arguments=arguments, **({"id": self.id} if self.id else {}))


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: json.loads takes them unless told


class ChatMessageIn(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[JsonObject] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None  # an assistant's reasoning, as answered (or "reasoning")
    reasoning: str | None = None

    def to_chat_message(self, images: list[str]) -> ChatMessage:
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=self.text(),
                           thinking=self.reasoning_content or self.reasoning or "", images=images,
                           tool_calls=[c.to_tool_call() for c in self.tool_calls or []],
                           tool_call_id=self.tool_call_id, tool_name=self.name if self.role == "tool" else None)

    def text(self) -> str:
        """Plain text content; parts of type "text" (and an assistant's "refusal") are joined;
        images are taken apart (``image_parts``); audio and files are not supported."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            kind = part.get("type")
            if kind == "image_url":
                continue
            field = "refusal" if kind == "refusal" and self.role == "assistant" else "text" if kind == "text" else None
            if field is None:
                shown = repr(kind) if isinstance(kind, str) and len(kind) <= 40 else "that type"
                raise BadRequest(f"content parts of type {shown} are not supported; send text and images "
                                 '(a string, or parts {"type": "text", "text": "..."} and '
                                 '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}})')
            if not isinstance(part.get(field), str):
                raise BadRequest(f'a content part of type "{kind}" needs "{field}": a string')
            texts.append(part[field])
        return "".join(texts)

    def image_parts(self) -> list[tuple[int, dict]]:
        """The message's image_url parts, with their places in its content."""
        if not isinstance(self.content, list):
            return []
        return [(i, part) for i, part in enumerate(self.content) if part.get("type") == "image_url"]


def image_url_of(part: dict, where: str) -> str:
    """An image part's URL: ``image_url.url``, or ``image_url`` itself (a string, as Ollama takes it)."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise BadRequest(f'{where} needs "image_url": {{"url": "data:image/png;base64,..."}}')
    return url


class FunctionName(WireModel):
    name: str


class NamedToolChoice(WireModel):
    """Call this function."""

    type: Literal["function"]
    function: FunctionName


class AllowedTools(WireModel):
    mode: Literal["auto", "required"]
    tools: list[NamedToolChoice]


class AllowedToolsChoice(WireModel):
    """Only these of the tools, and whether a call is required."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class CustomToolChoice(WireModel):
    """Call this custom (free-form) tool: OpenAI's form, refused with a clear message."""

    type: Literal["custom"]
    custom: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice | CustomToolChoice
TOOL_CHOICE_FORMS = ('tool_choice must be "none", "auto", "required", {"type": "function", "function": {"name": ...}} '
                     'or {"type": "allowed_tools", "allowed_tools": {"mode": "auto" or "required", '
                     '"tools": [{"type": "function", "function": {"name": ...}}, ...]}}')


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessageIn] = Field(default_factory=list)
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[JsonObject] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    reasoning_effort: str | None = None
    reasoning: JsonObject | None = None  # {"effort": ...}, the Responses API's form, taken here too

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _tool_choice(cls, v: object, handler: ValidatorFunctionWrapHandler) -> object:
        """One message listing the forms, instead of one per form tried."""
        try:
            return handler(v)
        except ValidationError:
            raise ValueError(TOOL_CHOICE_FORMS) from None

    def to_job(self, limits: RequestLimits | None = None) -> GenerationJob:
        """The job spec; ``limits`` (from the settings) bound the messages and their size."""
        if not self.messages:
            raise BadRequest("messages must contain at least one message")
        if limits is not None:
            limits.check_messages(len(self.messages))
            limits.check_prompt([m.text() + (m.reasoning_content or m.reasoning or "") for m in self.messages],
                                self.tools,
                                [c.function.arguments for m in self.messages for c in m.tool_calls or []])
        if self.max_completion_tokens is not None:
            sampling = self._sampling(self.max_completion_tokens, "max_completion_tokens")
        else:
            sampling = self._sampling(self.max_tokens)
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= 20:
                raise BadRequest("top_logprobs must be between 0 and 20")
            if not self.logprobs:
                raise BadRequest("top_logprobs needs logprobs: true")
        if self.logprobs:
            sampling.logprobs = self.top_logprobs or 0
        if self.response_format is not None:
            self.response_format.apply(sampling)
        images = [self._images(i, m) for i, m in enumerate(self.messages)]
        if limits is not None:
            limits.check_images([size for message in images for _, size in message])
        messages = [m.to_chat_message([text for text, _ in found]) for m, found in zip(self.messages, images)]
        return GenerationJob(job_id=new_job_id(), model=self.canonical_model(), kind="chat", messages=messages,
                             think=self._think(), sampling=sampling, created_at=clock.now())

    @staticmethod
    def _images(index: int, message: ChatMessageIn) -> list[tuple[str, int]]:
        """(base64, size) of each of the message's images: data: URLs here, remote ones already
        fetched and inlined by api/images.py."""
        found = []
        for j, part in message.image_parts():
            where = f"messages[{index}].content[{j}]"
            url = image_url_of(part, where)
            if not is_data_url(url):
                raise BadRequest(f"{where}: the image_url must be a data: URL (data:image/png;base64,...); this "
                                 "server fetches http(s) image URLs only when VLLAMA_FETCH_IMAGES is set")
            found.append(checked_image(url, where))
        return found

    def _think(self) -> Think:
        effort = self.reasoning_effort
        if effort is None and self.reasoning is not None:
            effort = self.reasoning.get("effort")
        try:
            return openai_effort(effort)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] = ""
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None  # how many top tokens to list per token (the legacy API's form)

    def to_jobs(self, limits: RequestLimits | None = None) -> list[GenerationJob]:
        """One job per prompt; ``limits`` (from the settings) bound the prompts' size."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise BadRequest("prompt must be a string or a non-empty list of strings")
        if limits is not None:
            limits.check_prompt([*prompts, self.suffix or ""])
        if self.echo:
            raise BadRequest("echo is not supported: the answer holds only the completion")
        sampling = self._sampling(self.max_tokens)
        if self.logprobs is not None:
            if not 0 <= self.logprobs <= 5:
                raise BadRequest("logprobs must be between 0 and 5")
            sampling.logprobs = self.logprobs
        # The text is continued as is: no chat template; with a suffix, in the model's
        # fill-in-the-middle format.
        return [GenerationJob(job_id=new_job_id(), model=self.canonical_model(), kind="generate", prompt=prompt,
                              suffix=self.suffix or None, raw=not self.suffix, sampling=sampling.model_copy(),
                              created_at=clock.now())
                for prompt in prompts]
