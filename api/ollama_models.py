"""Ollama's request bodies (exact field names) and their conversion to job specs.

Validation here is the single place bad input is caught: each message says what is wrong and
what to send instead. Unknown fields and unknown ``options`` keys are ignored, as Ollama does.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from api.bounds import (
    INT32_MAX,
    MAX_OLLAMA_STOPS,
    JsonObject,
    WireModel,
    check_int,
    check_seed,
    check_token_ids,
    stop_strings,
)
from common import clock
from common.durations import parse_keep_alive
from common.errors import BadRequest
from common.images import checked as checked_image
from common.model_defaults import OPTION_FIELDS, mark_given
from common.models import canonical_name
from common.ollama_templates import checked_template
from common.protocol import ChatMessage, GenerationJob, Sampling
from common.thinking import ollama_think
from common.tool_calls import ToolCall

if TYPE_CHECKING:
    from api.limits import RequestLimits

Format = JsonObject | str | None


class Options(WireModel):
    """The ``options`` keys that affect generation; others are accepted and ignored."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    num_predict: int | None = None
    stop: list[str] | str | None = None
    seed: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = None
    num_keep: int | None = None

    def to_sampling(self, fmt: Format) -> Sampling:
        s = Sampling()
        if self.temperature is not None:
            if not 0 <= self.temperature <= 2:
                raise BadRequest("options.temperature must be between 0 and 2")
            s.temperature = self.temperature
        if self.top_k is not None:
            if self.top_k < 0:
                raise BadRequest("options.top_k must be 0 (off) or more")
            check_int("options.top_k", self.top_k, 0, INT32_MAX)
            s.top_k = self.top_k
        if self.top_p is not None:
            if not 0 < self.top_p <= 1:
                raise BadRequest("options.top_p must be more than 0 and at most 1")
            s.top_p = self.top_p
        if self.min_p is not None:
            if not 0 <= self.min_p <= 1:
                raise BadRequest("options.min_p must be between 0 and 1")
            s.min_p = self.min_p
        if self.num_predict is not None:
            # Ollama: -1 means no limit, -2 means fill the context; both end at the context.
            if self.num_predict < -2:
                raise BadRequest(
                    f"options.num_predict is {self.num_predict}: use a positive number of tokens, "
                    "or -1 for no limit"
                )
            check_int("options.num_predict", self.num_predict, -2, INT32_MAX)
            s.max_tokens = self.num_predict if self.num_predict >= 0 else None
        s.stop = stop_strings("options.stop", self.stop, MAX_OLLAMA_STOPS)
        check_seed("options.seed", self.seed)
        if self.seed is not None and self.seed >= 0:  # Ollama: -1 means random
            s.seed = self.seed
        if self.repeat_penalty is not None:
            if self.repeat_penalty <= 0:
                raise BadRequest("options.repeat_penalty must be more than 0 (1 means off)")
            s.repetition_penalty = self.repeat_penalty
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None:
                if not -2 <= value <= 2:
                    raise BadRequest(f"options.{name} must be between -2 and 2")
                setattr(s, name, value)
        if self.num_ctx is not None:
            if self.num_ctx < 1:
                raise BadRequest("options.num_ctx must be a positive number of tokens")
            check_int("options.num_ctx", self.num_ctx, 1, INT32_MAX)
            s.num_ctx = self.num_ctx
        if self.num_keep is not None:
            check_int("options.num_keep", self.num_keep, -1, INT32_MAX)
            s.num_keep = self.num_keep
        _apply_format(s, fmt)
        mark_given(s, self, OPTION_FIELDS)
        return s


def _apply_format(s: Sampling, fmt: Format) -> None:
    if fmt is None or fmt == "":
        return
    if fmt == "json":
        s.json_object = True
    elif isinstance(fmt, dict):
        s.json_schema = fmt
    else:
        shown = repr(fmt) if len(repr(fmt)) <= 40 else repr(fmt)[:37] + "..."
        raise BadRequest(f'invalid format {shown}: use "json" or a JSON schema object')


class OllamaRequest(WireModel):
    """What every Ollama request body has: the model, its options, how long it stays loaded."""

    model: str = ""
    stream: bool = True
    format: Format = None
    options: Options = Field(default_factory=Options)
    keep_alive: float | str | None = None
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    truncate: bool | None = None  # None: true, as Ollama
    shift: bool | None = None  # None: true, as Ollama

    @field_validator("think", mode="before")
    @classmethod
    def _think(cls, v: object) -> object:
        """A bool or a level (common/thinking.py); whether the model thinks, the worker knows."""
        return None if v == "" else ollama_think(v)

    @field_validator("options", mode="before")
    @classmethod
    def _null_options(cls, v: object) -> object:
        return {} if v is None else v

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, v: object) -> object:
        """Checked at parse time, so every route (and a load-only request) refuses it alike."""
        if v is not None and v != "":
            try:
                parse_keep_alive(v)  # type: ignore[arg-type]
            except BadRequest as exc:
                raise ValueError(exc.message) from None
        return v

    def canonical_model(self) -> str:
        return canonical_name(self.model)

    def keep_alive_s(self) -> float | None:
        """Seconds an idle model stays loaded (-1: forever); None: the default."""
        if self.keep_alive is None or self.keep_alive == "":
            return None
        return parse_keep_alive(self.keep_alive)

    def sampling(self) -> Sampling:
        s = self.options.to_sampling(self.format)
        if not 0 <= self.top_logprobs <= 20:
            raise BadRequest("top_logprobs must be between 0 and 20")
        if self.logprobs:
            s.logprobs = self.top_logprobs
        return s


class GenerateRequest(OllamaRequest):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None  # token ids: checked in to_job, and against the vocabulary by the worker
    raw: bool = False
    images: list[str] | None = None

    def is_load_only(self) -> bool:
        return not self.prompt and not self.suffix

    def to_job(self, limits: RequestLimits | None = None) -> GenerationJob:
        """The job spec; ``limits`` (from the settings) bound the prompt's size."""
        if self.raw and (self.template or self.system or self.context):
            raise BadRequest("raw mode does not support template, system, or context")
        images, sizes = checked_images(self.images or [], "images")
        check_token_ids("context", self.context or [])
        if limits is not None:
            limits.check_prompt([self.prompt, self.system or "", self.suffix or ""])
            limits.check_images(sizes)
        return GenerationJob(
            job_id=new_job_id(),
            model=self.canonical_model(),
            kind="generate",
            prompt=self.prompt,
            suffix=self.suffix or None,
            template=checked_template(self.template) if self.template else None,
            system=self.system,
            raw=self.raw,
            context=self.context or [],
            images=images,
            think=self.think,
            truncate=self.truncate is not False,
            shift=self.shift is not False,
            sampling=self.sampling(),
            stream=True,
            created_at=clock.now(),
        )


class FunctionCall(WireModel):
    name: str
    arguments: JsonObject = Field(default_factory=dict)  # an object in Ollama's API


class ToolCallIn(WireModel):
    id: str | None = None
    function: FunctionCall


class Message(WireModel):
    role: str
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    def to_chat_message(self, images: list[str]) -> ChatMessage:
        calls = [ToolCall(name=c.function.name, arguments=c.function.arguments, **({"id": c.id} if c.id else {}))
                 for c in self.tool_calls or []]
        return ChatMessage(role=self.role, content=self.content or "", thinking=self.thinking or "", tool_calls=calls,
                           images=images, tool_name=self.tool_name, tool_call_id=self.tool_call_id)

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        role = v.lower()
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"role must be system, user, assistant or tool, not {v!r}")
        return role


class ChatRequest(OllamaRequest):
    messages: list[Message] = Field(default_factory=list)
    tools: list[JsonObject] | None = None

    def is_load_only(self) -> bool:
        return not self.messages

    def to_job(self, limits: RequestLimits | None = None) -> GenerationJob:
        """The job spec; ``limits`` (from the settings) bound the messages and their size."""
        checked = [checked_images(m.images or [], f"messages[{i}].images") for i, m in enumerate(self.messages)]
        sizes = [size for _, message_sizes in checked for size in message_sizes]
        if limits is not None:
            limits.check_messages(len(self.messages))
            limits.check_prompt([(m.content or "") + (m.thinking or "") for m in self.messages], self.tools,
                                [c.function.arguments for m in self.messages for c in m.tool_calls or []])
            limits.check_images(sizes)
        return GenerationJob(
            job_id=new_job_id(),
            model=self.canonical_model(),
            kind="chat",
            messages=[m.to_chat_message(images) for m, (images, _) in zip(self.messages, checked)],
            think=self.think,
            truncate=self.truncate is not False,
            shift=self.shift is not False,
            sampling=self.sampling(),
            stream=True,
            created_at=clock.now(),
        )


def checked_images(images: list[str], where: str) -> tuple[list[str], list[int]]:
    """Images as Ollama takes them (base64), each checked to be one: their base64, their sizes."""
    pairs = [checked_image(image, f"{where}[{i}]") for i, image in enumerate(images)]
    return [text for text, _ in pairs], [size for _, size in pairs]


def new_job_id() -> str:
    return uuid.uuid4().hex
