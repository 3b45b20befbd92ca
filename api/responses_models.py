"""OpenAI's Responses API request (/v1/responses) and its conversion to a chat job ("parse,
then trust"), with OpenAI's defaults (temperature 1, top_p 1, no length limit but the context).

``input`` is a string or a list of items: messages (with input_text, output_text and
input_image parts), function_call and function_call_output items, and reasoning items. They
become the chat job's messages: a function_call joins the assistant message before it (or
starts one), a function_call_output is a tool message naming the call, a reasoning item is the
thinking of the assistant message after it. ``instructions`` lead as a system message and,
as OpenAI defines, are not carried on to responses that continue this one.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from api.bounds import INT32_MAX, JsonObject, WireModel, check_int, hosted_sampling
from api.openai_models import FunctionCallIn, ToolCallIn
from common.errors import BadRequest
from common.images import checked as checked_image
from common.images import is_data_url
from common.model_defaults import mark_given
from common.models import canonical_name
from common.protocol import ChatMessage, Sampling
from common.thinking import Think, openai_effort

if TYPE_CHECKING:
    from api.limits import RequestLimits

TEXT_PARTS = ("input_text", "output_text", "refusal")


class ResponsesRequest(WireModel):
    model: str = ""
    input: str | list[JsonObject] = ""
    instructions: str | None = None
    tools: list[JsonObject] | None = None
    tool_choice: str | JsonObject | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    text: JsonObject | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    reasoning: JsonObject | None = None  # {"effort": ...}; "summary" is taken and not made
    # "auto": a conversation longer than the context loses its oldest items (system ones kept)
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None  # accepted and ignored

    def canonical_model(self) -> str:
        if not self.model.strip():
            raise BadRequest("you must provide a model parameter")
        return canonical_name(self.model)

    def input_messages(self, history: list[ChatMessage]) -> list[ChatMessage]:
        """This request's input as chat messages (``history``: the conversation before it,
        where a function_call_output finds the name of its call)."""
        items: list[dict[str, Any]] = [{"role": "user", "content": self.input}] if isinstance(self.input, str) \
            else list(self.input)
        if not items:
            raise BadRequest("input must be a string or a non-empty list of items")
        names = {c.id: c.name for m in history for c in m.tool_calls}
        out: list[ChatMessage] = []
        thinking = ""  # a reasoning item's, for the assistant message that follows it
        for i, item in enumerate(items):
            where = f"input[{i}]"
            kind = item.get("type", "message")
            if kind == "message":
                message = _message(item, where)
                if thinking and message.role == "assistant":
                    message.thinking, thinking = thinking, ""
                out.append(message)
            elif kind == "function_call":
                call = ToolCallIn(id=item.get("call_id"), function=FunctionCallIn(
                    name=_string(item, "name", where), arguments=_string(item, "arguments", where))).to_tool_call()
                names[call.id] = call.name
                if not out or out[-1].role != "assistant":  # else it joins the assistant's message
                    out.append(ChatMessage(role="assistant", thinking=thinking))
                    thinking = ""
                out[-1].tool_calls.append(call)
            elif kind == "function_call_output":
                call_id = _string(item, "call_id", where)
                out.append(ChatMessage(role="tool", content=_output_text(item.get("output"), where),
                                       tool_call_id=call_id, tool_name=names.get(call_id)))
            elif kind == "reasoning":
                thinking += _reasoning_text(item, where)
            else:
                shown = repr(kind) if isinstance(kind, str) and len(kind) <= 40 else "that type"
                raise BadRequest(f"{where}: items of type {shown} are not supported; send messages, "
                                 "function_call, function_call_output and reasoning items")
        return out

    def function_tools(self) -> list[dict[str, Any]] | None:
        """Function tools in chat completions' shape (``{"type": "function", "function": {...}}``)."""
        if not self.tools:
            return None
        tools = []
        for i, tool in enumerate(self.tools):
            if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
                raise BadRequest(f"tools[{i}] must be a function tool {{\"type\": \"function\", \"name\": ..., "
                                 f"\"parameters\": {{...}}}}; built-in tools (type {tool.get('type')!r}) are not "
                                 "supported")
            function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
            tools.append({"type": "function", "function": function})
        return tools

    def chat_tool_choice(self) -> Any:
        """tool_choice in chat completions' forms (api/tools.py reads them)."""
        choice = self.tool_choice
        if not isinstance(choice, dict):
            return choice
        if choice.get("type") == "function":
            return {"type": "function", "function": {"name": choice.get("name")}}
        if choice.get("type") == "allowed_tools":
            return {"type": "allowed_tools", "allowed_tools": {
                "mode": choice.get("mode"), "tools": [{"type": "function", "function": {"name": t.get("name")}}
                                                      for t in choice.get("tools") or [] if isinstance(t, dict)]}}
        raise BadRequest('tool_choice must be "none", "auto", "required", {"type": "function", "name": ...} or '
                         '{"type": "allowed_tools", "mode": ..., "tools": [...]}')

    def think(self) -> Think:
        try:
            return openai_effort((self.reasoning or {}).get("effort"))
        except ValueError as exc:
            raise BadRequest(str(exc).replace("reasoning_effort", "reasoning.effort")) from None

    def sampling(self) -> Sampling:
        s = hosted_sampling(self.temperature, self.top_p)
        if self.max_output_tokens is not None:
            check_int("max_output_tokens", self.max_output_tokens, 1, INT32_MAX)
            s.max_tokens = self.max_output_tokens
        form = (self.text or {}).get("format") or {"type": "text"}
        if form.get("type") == "json_object":
            s.json_object = True
        elif form.get("type") == "json_schema":
            if not isinstance(form.get("schema"), dict):
                raise BadRequest('text.format of type "json_schema" needs "schema": a JSON schema object')
            s.json_schema = form["schema"]
        elif form.get("type") != "text":
            raise BadRequest('text.format.type must be "text", "json_object" or "json_schema"')
        mark_given(s, self, {"temperature": "temperature", "top_p": "top_p", "max_output_tokens": "max_tokens"})
        return s

    def image_parts(self) -> list[tuple[str, dict[str, Any]]]:
        """(where, part) of each input_image part."""
        items = self.input if isinstance(self.input, list) else []
        return [(f"input[{i}].content[{j}]", part) for i, item in enumerate(items)
                if isinstance(item.get("content"), list)
                for j, part in enumerate(item["content"]) if isinstance(part, dict) and part.get("type") == "input_image"]

    def check(self, messages: list[ChatMessage], limits: RequestLimits) -> None:
        """The whole conversation (history, instructions, input) within the server's limits."""
        limits.check_messages(len(messages))
        limits.check_prompt([m.content + m.thinking for m in messages], self.tools,
                            [c.arguments for m in messages for c in m.tool_calls])
        limits.check_images([len(image) * 3 // 4 for m in messages for image in m.images])


def _message(item: dict[str, Any], where: str) -> ChatMessage:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise BadRequest(f'{where}.role must be "user", "system", "developer" or "assistant"')
    content = item.get("content")
    if isinstance(content, str):
        return ChatMessage(role="system" if role == "developer" else role, content=content)
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or a list of content parts")
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            texts.append(_string(part, "refusal" if kind == "refusal" else "text", at))
        elif kind == "input_image" and role == "user":
            url = part.get("image_url")
            if not isinstance(url, str) or not is_data_url(url):
                raise BadRequest(f"{at}: image_url must be a data: URL (data:image/png;base64,...); this server "
                                 "fetches http(s) image URLs only when VLLAMA_FETCH_IMAGES is set")
            images.append(checked_image(url, at)[0])
        else:
            shown = repr(kind) if isinstance(kind, str) and len(kind) <= 40 else "that type"
            raise BadRequest(f"{at}: content parts of type {shown} are not supported; send input_text "
                             "(output_text for an assistant) and input_image parts")
    return ChatMessage(role="system" if role == "developer" else role, content="".join(texts), images=images)


def _output_text(output: object, where: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "".join(_string(p, "text", f"{where}.output[{k}]") for k, p in enumerate(output)
                       if isinstance(p, dict) and p.get("type") in TEXT_PARTS)
    if isinstance(output, (dict, int, float, bool)):
        return json.dumps(output)
    raise BadRequest(f'{where} needs "output": a string')


def _reasoning_text(item: dict[str, Any], where: str) -> str:
    """A reasoning item's text: its content, or else its summary."""
    for field in ("content", "summary"):
        parts = item.get(field)
        if isinstance(parts, list) and parts:
            return "".join(_string(p, "text", f"{where}.{field}[{k}]") for k, p in enumerate(parts)
                           if isinstance(p, dict))
    return ""


def _string(item: dict[str, Any], field: str, where: str) -> str:
    value = item.get(field)
    if not isinstance(value, str):
        raise BadRequest(f'{where} needs "{field}": a string')
    return value
