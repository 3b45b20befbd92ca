"""Requests that carry tools, while tool calling is not implemented yet.

Clients such as Open WebUI send tools with every chat; Ollama answers 400 "<model> does not
support tools" for models that cannot take them, which breaks those clients. By default the
request is served without its tools: a normal reply, a warning in the log, and a response
header saying the tools were dropped. VLLAMA_STRICT_TOOLS restores Ollama's 400. A request
that insists on a tool call (tool_choice "required" or a named function) cannot be honoured
by a normal reply and is refused.
"""

from __future__ import annotations

import logging
from typing import Any

from common.errors import BadRequest

log = logging.getLogger(__name__)

TOOLS_DROPPED_HEADER = "X-Vllama-Tools-Dropped"


def tools_headers(model: str, tools: list[Any] | None, tool_choice: Any, strict: bool) -> dict[str, str]:
    """Headers for the response (empty when no tools were sent); raises when the request
    cannot be served without them."""
    if not tools or tool_choice == "none":
        return {}
    if strict:
        raise BadRequest(f'"{model}" does not support tools')
    if tool_choice == "required" or isinstance(tool_choice, dict):
        raise BadRequest("tool calling is not supported yet, so tool_choice \"required\" or a named "
                         "function cannot be honoured; send tool_choice \"auto\" or no tools")
    log.warning("%s: serving a request without its %d tools (tool calling is not supported yet)",
                model, len(tools))
    return {TOOLS_DROPPED_HEADER: str(len(tools))}
