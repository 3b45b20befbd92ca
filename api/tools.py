"""Which tools a chat request gets, decided before its job is queued.

A model takes tools when its chat template renders them in a format a vLLM tool parser
reads back (common/tool_calls.py; the catalog's description names the parser). Clients such
as Open WebUI send tools with every chat; Ollama answers 400 "<model> does not support tools"
for other models, which breaks those clients. So by default such a request is served
without its tools: a normal reply, a warning in the log, and a response header saying the
tools were dropped. VLLAMA_STRICT_TOOLS restores Ollama's 400. A request that insists on a
call (tool_choice "required" or a named function) is served on any model: the answer is
constrained to the call's JSON schema, so no parser is needed. tool_choice "allowed_tools"
narrows the tools to those it names, then acts as its mode ("auto" or "required") says.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import TypeAdapter, ValidationError

from api.dispatch import Dispatcher
from api.openai_models import TOOL_CHOICE_FORMS, AllowedToolsChoice, CustomToolChoice, NamedToolChoice, ToolChoice
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


_TOOL_CHOICE: TypeAdapter[ToolChoice | None] = TypeAdapter(ToolChoice | None)


def _requested(tools: list[Any] | None, tool_choice: Any, parallel: bool | None) -> ToolUse | None:
    """The request's tools and tool_choice (every form OpenAI's chat completions take;
    Ollama sends only tools)."""
    if not isinstance(tool_choice, (NamedToolChoice, AllowedToolsChoice, CustomToolChoice)):
        try:
            tool_choice = _TOOL_CHOICE.validate_python(tool_choice)
        except ValidationError:
            raise BadRequest(TOOL_CHOICE_FORMS) from None
    if isinstance(tool_choice, CustomToolChoice):
        raise BadRequest("custom tools are not supported: send function tools, and a tool_choice that names "
                         "a function")
    if tool_choice == "none":
        return None
    if not tools:
        if tool_choice in (None, "auto"):
            return None
        raise BadRequest("tool_choice asks for a tool call, but the request has no tools; send tools too")
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
    if isinstance(tool_choice, AllowedToolsChoice):
        allowed = [_named(checked, c.function.name) for c in tool_choice.allowed_tools.tools]
        if not allowed:
            raise BadRequest("tool_choice.allowed_tools.tools must name at least one function")
        use.tools = [t for t in checked if t["function"]["name"] in allowed]
        use.choice = tool_choice.allowed_tools.mode
        return use
    use.choice, use.function = "function", _named(checked, tool_choice.function.name)
    return use


def _named(tools: list[dict[str, Any]], name: str) -> str:
    if name not in function_names(tools):
        shown = name if len(name) <= 64 else name[:61] + "..."
        raise BadRequest(f"tool_choice names the function {shown!r}, which is not among the tools")
    return name
