"""Thinking (reasoning) models, the parts the API and the workers share (no vLLM here).

A model that thinks writes its reasoning before its answer, between markers its chat template
taught it (``<think>...</think>`` and kin); vLLM's reasoning parsers read them back. As with
tool calls, the markers are a property of the template, so the template names the parser
(``reasoning_parser_for``). Whether to think is asked of the template too: Qwen3-style
templates read ``enable_thinking``, DeepSeek-V3.1-style ones ``thinking``, gpt-oss-style ones
a ``reasoning_effort`` level; ``template_kwargs`` sets all that apply.

A request's ``think`` is Ollama's: unset (the model's default: a thinking model thinks), true,
false, or a level. The API normalizes it (and OpenAI's ``reasoning_effort``) to ``Think``;
the worker, which holds the model's template, decides the rest, and answers Ollama's 400
``"<model>" does not support thinking`` when a model that cannot think is asked to.
"""

from __future__ import annotations

from typing import Literal

ThinkLevel = Literal["low", "medium", "high", "max"]
Think = bool | ThinkLevel | None
THINK_LEVELS: tuple[str, ...] = ("low", "medium", "high", "max")

# (what the chat template contains, the vLLM reasoning parser for the markers it teaches);
# first match wins.
_TEMPLATE_FORMATS: list[tuple[str, str]] = [
    ("<|channel|>", "openai_gptoss"),  # gpt-oss (harmony): analysis and final channels
    ("<seed:think>", "seed_oss"),  # Seed-OSS
    ("[THINK]", "mistral"),  # Magistral
    ("Here is my thought process", "granite"),  # Granite 3.2+
    ("enable_thinking", "qwen3"),  # Qwen3, SmolLM3: <think> with a switch in the template
    ("<think>", "deepseek_r1"),  # DeepSeek-R1 and its distills, QwQ: they always think
]

# OpenAI's reasoning_effort values, as Ollama maps them.
_EFFORTS: dict[str, Think] = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
                              "max": "max", "xhigh": "max", "ultra": "max"}


def reasoning_parser_for(template: str) -> str | None:
    """The vLLM reasoning parser for a model whose chat template is ``template``; None when
    the template teaches no thinking format known here."""
    return next((parser for marker, parser in _TEMPLATE_FORMATS if marker in template), None)


def takes_levels(template: str) -> bool:
    """Whether the template reads a reasoning level (gpt-oss's ``reasoning_effort``)."""
    return "reasoning_effort" in template


def ollama_think(value: object) -> Think:
    """Ollama's ``think`` field: a bool or a level; ValueError (a 400) for anything else."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in ("true", "false"):
            return value == "true"
        if value in THINK_LEVELS:
            return value  # type: ignore[return-value]
    raise ValueError(f"invalid think value {value!r}: use true, false, or one of "
                     f"{', '.join(repr(x) for x in THINK_LEVELS)}")


def openai_effort(value: object) -> Think:
    """OpenAI's ``reasoning_effort`` as a ``think`` value; ValueError (a 400) for an unknown one."""
    if value is None:
        return None
    if isinstance(value, str) and value in _EFFORTS:
        return _EFFORTS[value]
    raise ValueError(f"invalid reasoning_effort {value!r}: use one of {', '.join(repr(x) for x in _EFFORTS)}")


def template_kwargs(think: Think, levels: bool) -> dict[str, object]:
    """What a chat template reads to think (or not) as ``think`` asks; nothing when unset,
    so the template does what it does by default."""
    if think is None:
        return {}
    enabled = think is not False
    kwargs: dict[str, object] = {"enable_thinking": enabled, "thinking": enabled}
    if enabled and levels:
        # true is Ollama's "medium"; gpt-oss knows no level above "high".
        kwargs["reasoning_effort"] = {True: "medium", "max": "high"}.get(think, think)
    return kwargs
