"""Which tools a chat request gets, decided before its job is queued.

A model takes tools when its chat template renders them in a format a vLLM tool parser
reads back (common/tool_calls.py; the catalog's description names the parser). Clients such
as Open WebUI send tools with every chat; Ollama answers 400 "<model> does not support tools"
for other models, which breaks those clients. So by default such a request is served
without its tools: a normal reply, a warning in the log, and a response header saying the
tools were dropped. VLLAMA_STRICT_TOOLS restores Ollama's 400. A request that insists on a
call (tool_choice "required" or a named function) is served on any model: the answer is
constrained to the call's JSON schema, so no parser is needed.
"""

from __future__ import annotations

import logging
from typing import Any

from api.dispatch import Dispatcher
from common import catalog
from common.errors import BadRequest
from common.protocol import GenerationJob
from common.tool_calls import ToolUse, check_tools, forced_schema, function_names

log = logging.getLogger(__name__)

TOOLS_DROPPED_HEADER = "X-Vllama-Tools-Dropped"


async def attach_tools(dispatcher: Dispatcher, job: GenerationJob, shown_model: str, tools: list[Any] | None,
                       tool_choice: Any = None, parallel: bool | None = None) -> dict[str, str]:
    """Give ``job`` its tools (and, for a required call, the schema its answer must follow);
    returns the response's extra headers."""
    use = _requested(tools, tool_choice, parallel)
    if use is None:
        return {}
    if use.choice != "auto":
        job.sampling.json_schema, job.sampling.json_object = forced_schema(use), False
        job.tool_use = use
        return {}
    entry = await catalog.lookup(dispatcher.redis, job.model)
    use.parser = entry.manifest.description.tool_parser if entry is not None else None
    if use.parser is not None:
        job.tool_use = use
        return {}
    if dispatcher.settings.strict_tools:
        raise BadRequest(f'"{shown_model}" does not support tools')
    log.warning("%s cannot take tools (its chat template renders none that can be read back): serving the "
                "request without its %d tools", job.model, len(use.tools))
    return {TOOLS_DROPPED_HEADER: str(len(use.tools))}


def _requested(tools: list[Any] | None, tool_choice: Any, parallel: bool | None) -> ToolUse | None:
    """The request's tools and tool_choice (OpenAI's forms; Ollama sends only tools)."""
    if not tools or tool_choice == "none":
        return None
    try:
        checked = check_tools(tools)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    use = ToolUse(tools=checked, parallel=parallel is not False)
    if tool_choice in (None, "auto"):
        return use
    if tool_choice == "required":
        use.choice = "required"
        return use
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise BadRequest('tool_choice must be "none", "auto", "required" or '
                         '{"type": "function", "function": {"name": ...}}')
    if name not in function_names(checked):
        raise BadRequest(f"tool_choice names the function {name!r}, which is not among the tools")
    use.choice, use.function = "function", name
    return use
