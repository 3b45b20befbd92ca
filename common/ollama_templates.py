"""A prompt written with an Ollama template (a Go template: /api/generate's ``template``, or
the one a model was created with) instead of the model's own chat template, filled in as
Ollama fills it:
- a template that reads ``.Messages`` gets the whole conversation at once, consecutive
  messages of one role merged and the system messages joined into ``.System``;
- an older one, without ``.Messages``, is rendered once per turn with ``.System``,
  ``.Prompt`` and ``.Response``, the last turn only up to its ``.Response`` (where the answer
  goes on);
- with a ``suffix`` (fill-in-the-middle), it gets ``.Prompt`` and ``.Suffix`` alone.
The text is then tokenized as a raw prompt: the special tokens it writes are the model's.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from common.errors import BadRequest
from common.go_template import Template, TemplateError, message_values, parse, tool_values
from common.protocol import ChatMessage
from common.thinking import Think


@lru_cache(maxsize=64)
def compile_template(text: str) -> Template:
    """The template; TemplateError if it is malformed or outside the subset we render. Like
    Ollama, a template that never reads ``.Response`` gets it appended."""
    template = parse(text)
    return template if "response" in template.identifiers else parse(text + "{{ .Response }}")


def checked_template(text: str) -> str:
    """``text``, if it is a template we render; else a 400 saying what is not supported."""
    try:
        compile_template(text)
    except TemplateError as exc:
        raise BadRequest(str(exc)) from None
    return text


def collate(messages: list[ChatMessage]) -> tuple[str, list[ChatMessage]]:
    """(the system messages joined, the conversation with consecutive messages of one role
    merged; tool results stay apart), as Ollama gives them to a template."""
    system, merged = [], []
    for message in messages:
        if message.role == "system":
            system.append(message.content)
        if merged and merged[-1].role == message.role != "tool":
            last = merged[-1]
            merged[-1] = last.model_copy(update={"content": f"{last.content}\n\n{message.content}",
                                                 "images": [*last.images, *message.images]})
        else:
            merged.append(message)
    return "\n\n".join(system), merged


def _think_values(think: Think) -> dict[str, Any]:
    return {"Think": think not in (None, False), "ThinkLevel": think if isinstance(think, str) else "",
            "IsThinkSet": think is not None}


def render(template: Template, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None,
           think: Think = None) -> str:
    """The prompt of a conversation."""
    system, merged = collate(messages)
    if "messages" in template.identifiers:
        return template.render({"System": system, "Messages": message_values(merged),
                                "Tools": tool_values(tools) if tools else None, "Response": "",
                                **_think_values(think)})
    # One render per turn: a turn ends where the next system or user message begins after it.
    out: list[str] = []
    turn = {"System": "", "Prompt": "", "Response": ""}
    for message in merged:
        role = message.role
        if (role == "system" and (turn["Prompt"] or turn["Response"])) or (role == "user" and turn["Response"]):
            out.append(template.render({**turn, **_think_values(think)}))
            turn = {"System": "", "Prompt": "", "Response": ""}
        key = {"system": "System", "user": "Prompt", "assistant": "Response"}.get(role)
        if key is not None:
            turn[key] = message.content
    out.append(template.render({**turn, **_think_values(think)}, stop_after="Response"))
    return "".join(out)


def render_fill_in(template: Template, prompt: str, suffix: str) -> str | None:
    """The fill-in-the-middle prompt; None if the template does not read ``.Suffix``."""
    if "suffix" not in template.identifiers:
        return None
    return template.render({"Prompt": prompt, "Suffix": suffix, "Response": ""})
