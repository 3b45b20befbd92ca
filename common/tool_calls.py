"""Tool calling, the parts the API and the workers share (no vLLM here).

A model calls tools by writing them in the format its chat template taught it; vLLM's tool
parsers read that format back. ``tool_parser_for`` names the parser that fits a model's
template (the format is a property of the template, so the template decides). When a
request insists on a call (tool_choice "required" or a named function), no parser is
needed: the answer is constrained to JSON by a schema built here (structured outputs, on
any model), and ``forced_calls`` turns that JSON into calls.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel, Field

# (what the chat template contains, the vLLM tool parser for the calls it teaches); first match wins.
_TEMPLATE_FORMATS: list[tuple[str, str]] = [
    ("<function=", "qwen3_coder"),  # Qwen3-Coder: <tool_call><function=name><parameter=...>
    ("<tool_call>", "hermes"),  # Hermes, Qwen2.5, Qwen3, SmolLM3, the bundled model's template
    ("<|python_tag|>", "llama3_json"),  # Llama 3.1 / 3.3
    ("ipython", "llama3_json"),  # Llama 3.2 ("Environment: ipython")
    ("[TOOL_CALLS]", "mistral"),  # Mistral, Mixtral, Mistral-Nemo
    ("<|tool_call|>", "granite"),  # Granite 3
]
_JINJA_CODE = re.compile(r"{%.*?%}|{{.*?}}", re.DOTALL)


def tool_parser_for(template: str) -> str | None:
    """The vLLM tool parser for a model whose chat template is ``template``; None when the
    template does not render tools or writes calls in a format no parser here knows."""
    if not re.search(r"\btools\b", " ".join(_JINJA_CODE.findall(template))):
        return None
    return next((parser for marker, parser in _TEMPLATE_FORMATS if marker in template), None)


class ToolCall(BaseModel):
    """One call the model made. ``arguments`` is an object: Ollama sends it as one, OpenAI
    as its JSON text (api/openai_routes.py)."""

    id: str = Field(default_factory=lambda: "call_" + secrets.token_hex(12))
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolUse(BaseModel):
    """The tools of one chat request, as the worker needs them."""

    tools: list[dict[str, Any]]  # OpenAI function tools: {"type": "function", "function": {...}}
    choice: Literal["auto", "required", "function"] = "auto"
    function: str | None = None  # the one function to call, with choice "function"
    parser: str | None = None  # the vLLM tool parser reading the model's calls, with choice "auto"
    parallel: bool = True  # whether "required" may answer several calls


def function_names(tools: list[dict[str, Any]]) -> list[str]:
    return [tool["function"]["name"] for tool in tools]


def check_tools(tools: list[Any]) -> list[dict[str, Any]]:
    """OpenAI's (and Ollama's) tool objects, or BadRequest-worthy ValueError saying what is wrong."""
    checked = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., '
                             f'"parameters": {{...}}}}}}')
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        checked.append({"type": "function", "function": function})
    return checked


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def forced_schema(use: ToolUse) -> dict[str, Any]:
    """The JSON schema an answer must follow when a call is required: the named function's
    arguments, or a list of ``{"name", "parameters"}`` calls (vLLM's format for "required")."""
    if use.choice == "function":
        [tool] = [t for t in use.tools if t["function"]["name"] == use.function]
        return _parameters(tool)
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": [
            {"properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                            "parameters": _parameters(t)},
             "required": ["name", "parameters"]}
            for t in use.tools
        ]},
    }
    if not use.parallel:
        schema["maxItems"] = 1
    return schema


def forced_calls(use: ToolUse, text: str) -> list[ToolCall] | None:
    """The calls in an answer constrained by ``forced_schema``; None if it is not complete
    JSON (the answer ran out of tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if use.choice == "function":
        return [ToolCall(name=use.function or "", arguments=value)] if isinstance(value, dict) else None
    if not isinstance(value, list):
        return None
    calls = [ToolCall(name=item["name"], arguments=item["parameters"]) for item in value
             if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("parameters"), dict)]
    return calls or None
