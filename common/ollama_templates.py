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

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from common.errors import BadRequest
from common.go_template import Template, TemplateError, parse
from common.go_values import JsonList, JsonMap
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


# ---------------------------------------------------------------- Ollama's data

def message_values(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """Chat messages (dicts or models with ``model_dump``: role, content, thinking, images,
    tool_calls, tool_name, tool_call_id) as Ollama's templates read them, every field present
    as Go's struct would have it; a call's ``Function.Arguments`` prints as JSON."""
    values = []
    for message in messages:
        m = message.model_dump() if hasattr(message, "model_dump") else message
        calls = []
        for i, call in enumerate(m.get("tool_calls") or []):
            function = call.get("function", call)  # Ollama's wire shape or our flat ToolCall
            arguments = function.get("arguments") or {}
            calls.append({"ID": call.get("id") or "", "Function": {
                "Index": function.get("index", i), "Name": function.get("name") or "",
                "Arguments": JsonMap(arguments)}})
        values.append({"Role": m.get("role") or "", "Content": m.get("content") or "",
                       "Thinking": m.get("thinking") or "", "Images": list(m.get("images") or []),
                       "ToolCalls": calls, "ToolName": m.get("tool_name") or "",
                       "ToolCallID": m.get("tool_call_id") or ""})
    return values


def tool_values(tools: Iterable[dict[str, Any]]) -> JsonList:
    """Function tools (``{"type": "function", "function": {"name", "description", "parameters"}}``)
    as Ollama's templates read them: Go field names, and the list, each tool, its function, its
    parameters and their properties printing as the JSON Ollama writes for them (its fields in
    its order, the keys it does not know left out; properties in the order given)."""
    values = JsonList()
    for tool in tools:
        wire = _tool_json(tool)
        function, params = wire["function"], wire["function"]["parameters"]
        properties = (tool.get("function") or {}).get("parameters", {}).get("properties") or {}
        param_fields = {"Type": params["type"], "Defs": params.get("$defs"), "Items": params.get("items"),
                        "Required": params.get("required", []),
                        "Properties": JsonMap({name: _property_value(p) for name, p in properties.items()},
                                              params["properties"])}
        function_fields = {"Name": function["name"], "Description": function["description"],
                           "Parameters": JsonMap(param_fields, params)}
        values.append(JsonMap({"Type": wire["type"], "Items": wire.get("items"),
                               "Function": JsonMap(function_fields, function)}, wire))
    return values


def _tool_json(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function") or {}
    params = function.get("parameters") or {}
    params_json = {"type": params.get("type") or "", **_present(params, "$defs", "items"), **_given(params, "required")}
    properties = params.get("properties")
    params_json["properties"] = None if properties is None else {k: _property_json(p) for k, p in properties.items()}
    return {"type": tool.get("type") or "", **_present(tool, "items"),
            "function": {"name": function.get("name") or "", "description": function.get("description") or "",
                         "parameters": params_json}}


def _property_json(prop: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if prop.get("anyOf"):
        out["anyOf"] = [_property_json(p) for p in prop["anyOf"]]
    kind = prop.get("type")
    if kind:
        out["type"] = kind[0] if isinstance(kind, list) and len(kind) == 1 else kind
    out |= _present(prop, "items") | _given(prop, "description", "enum")
    if prop.get("properties"):
        out["properties"] = {k: _property_json(p) for k, p in prop["properties"].items()}
    return out | _given(prop, "required")


def _present(source: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: source[key] for key in keys if source.get(key) is not None}


def _given(source: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The keys Go's ``omitempty`` keeps: those neither missing nor empty."""
    return {key: source[key] for key in keys if source.get(key)}


def _property_value(prop: dict[str, Any]) -> JsonMap:
    wire = _property_json(prop)
    return JsonMap({"AnyOf": [_property_value(p) for p in prop.get("anyOf") or []], "Type": wire.get("type", ""),
                    "Items": prop.get("items"), "Description": prop.get("description") or "",
                    "Enum": list(prop.get("enum") or []), "Properties": prop.get("properties"),
                    "Required": list(prop.get("required") or [])}, wire)
