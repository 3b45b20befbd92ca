"""What a model made with /api/create brings to every request to it: a system prompt, messages
that open every chat, and default options (Ollama's SYSTEM, MESSAGE and PARAMETER).

A request's own values win: its system message (or ``system``), and each option it sets.
The request parsers record which sampling fields the request set (``Sampling.given``), so a
default fills only the others, whichever API the request came through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.protocol import ChatMessage, GenerationJob, Sampling

if TYPE_CHECKING:
    from common.model_info import ModelDescription

# Ollama's option names -> the Sampling field each sets.
OPTION_FIELDS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "num_predict": "max_tokens", "stop": "stop", "seed": "seed", "repeat_penalty": "repetition_penalty",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "num_ctx": "num_ctx",
                 "num_keep": "num_keep"}


def mark_given(sampling: Sampling, request: Any, fields: dict[str, str]) -> None:
    """Record the sampling fields ``request`` set: each of its ``fields`` (request field ->
    Sampling field) that its body held, not null."""
    sent = getattr(request, "model_fields_set", set())
    sampling.given.update(field for name, field in fields.items() if name in sent and getattr(request, name) is not None)


def apply(job: GenerationJob, description: ModelDescription) -> None:
    """Give ``job`` what its model was created with, where the request did not say."""
    _apply_options(job.sampling, description.options)
    if job.kind == "chat" and (description.system or description.messages):
        own_system = bool(job.messages) and job.messages[0].role == "system"
        lead = job.messages[:1] if own_system else \
            [ChatMessage(role="system", content=description.system)] if description.system else []
        job.messages = [*lead, *(ChatMessage(**m) for m in description.messages),
                        *job.messages[1 if own_system else 0:]]
    elif job.kind == "generate" and not job.raw and job.system is None and description.system:
        job.system = description.system
    if job.kind != "embed" and not job.raw and job.template is None and description.prompt_template:
        job.template = description.prompt_template


def _apply_options(sampling: Sampling, options: dict[str, Any]) -> None:
    for name, value in options.items():
        field = OPTION_FIELDS.get(name)
        if field is None or field in sampling.given:
            continue
        if name == "num_predict":
            value = value if value >= 0 else None  # -1, -2: until the context is full
        elif name == "seed":
            value = value if value >= 0 else None  # -1: random
        elif name == "stop":
            value = [value] if isinstance(value, str) else list(value)
        setattr(sampling, field, value)
