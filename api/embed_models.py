"""The embedding request bodies of both APIs and their job specs: Ollama's /api/embed and older
/api/embeddings, and OpenAI's /v1/embeddings. A request is one job holding all its inputs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from api.bounds import INT32_MAX, WireModel, check_int, check_token_ids
from api.limits import RequestLimits
from api.ollama_models import OllamaRequest, new_job_id
from common import clock
from common.errors import BadRequest, TooLarge
from common.models import canonical_name
from common.protocol import EmbedInput, GenerationJob

# Inputs per request. OpenAI allows 2,048; Ollama sets no limit. Each input is one engine
# request, all of them at once on one worker.
MAX_INPUTS = 4096


def _inputs_within(count: int) -> None:
    if count > MAX_INPUTS:
        raise TooLarge(f"the request has {count} inputs, more than the {MAX_INPUTS} allowed; "
                       "send them in several requests")


def _job(model: str, spec: EmbedInput, limits: RequestLimits | None) -> GenerationJob:
    _inputs_within(len(spec.texts) + len(spec.token_ids))
    if limits is not None:
        limits.check_prompt(spec.texts)
    if spec.dimensions is not None:
        check_int("dimensions", spec.dimensions, 1, INT32_MAX, "; leave it out for the model's full vectors")
    return GenerationJob(job_id=new_job_id(), model=canonical_name(model), kind="embed", embed=spec,
                         created_at=clock.now())


class EmbedRequest(OllamaRequest):
    """Ollama's POST /api/embed: ``input`` a string or a list of strings."""

    input: Any = None
    truncate: bool | None = None  # None: true
    dimensions: int | None = None

    def texts(self) -> list[str]:
        if self.input is None:
            return []
        if isinstance(self.input, str):
            return [self.input] if self.input else []
        if isinstance(self.input, list) and all(isinstance(t, str) for t in self.input):
            return self.input
        raise BadRequest("invalid input type: input must be a string or a list of strings")

    def to_job(self, limits: RequestLimits | None = None) -> GenerationJob:
        spec = EmbedInput(texts=self.texts(), truncate=self.truncate is not False, dimensions=self.dimensions)
        return _job(self.model, spec, limits)


class LegacyEmbeddingsRequest(OllamaRequest):
    """Ollama's older POST /api/embeddings: one ``prompt``, its vector not normalized."""

    prompt: str = ""

    def to_job(self, limits: RequestLimits | None = None) -> GenerationJob:
        return _job(self.model, EmbedInput(texts=[self.prompt], normalize=False), limits)


class OpenAIEmbeddingsRequest(WireModel):
    """OpenAI's POST /v1/embeddings: a string, a list of strings, token ids, or lists of them."""

    model: str = ""
    input: Any = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("encoding_format", mode="before")
    @classmethod
    def _format(cls, v: object) -> object:
        if v is None:
            return "float"
        if v not in ("float", "base64"):
            raise ValueError(f'encoding_format must be "float" or "base64", not {v!r}')
        return v

    def to_job(self, limits: RequestLimits | None = None) -> GenerationJob:
        if not self.model:
            raise BadRequest("you must provide a model parameter")
        return _job(self.model, EmbedInput(dimensions=self.dimensions, **_openai_input(self.input)), limits)


def _is_ids(value: object) -> bool:
    """A non-empty list of integers (a JSON true is not a token id)."""
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def _openai_input(value: object) -> dict[str, list]:
    """``texts`` or ``token_ids`` of OpenAI's four shapes of ``input``."""
    if isinstance(value, str):
        return {"texts": [value]}  # an empty string is one input
    if isinstance(value, list) and value:
        if all(isinstance(t, str) for t in value):
            return {"texts": value}
        if _is_ids(value):
            check_token_ids("input", value)
            return {"token_ids": [value]}
        if all(_is_ids(ids) for ids in value):
            for i, ids in enumerate(value):
                check_token_ids(f"input[{i}]", ids)
            return {"token_ids": value}
    raise BadRequest("invalid input: send a string, a list of strings, a list of token ids, or a list of "
                     "non-empty lists of token ids")

