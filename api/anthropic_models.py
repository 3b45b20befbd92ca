"""Anthropic's Messages API request (/v1/messages, /v1/messages/count_tokens) and its
conversion to a chat job ("parse, then trust"), with Anthropic's defaults (temperature 1, no
top_p or top_k, max_tokens required).

Content blocks map onto the chat job's messages: text and images as they are; an assistant's
``tool_use`` blocks become its tool calls and ``thinking`` its reasoning; a user's
``tool_result`` blocks become tool messages (before the rest of that user turn, as they answer
the calls of the turn before). Tools are Anthropic's ``{name, description, input_schema}``,
handed on as the function tools every chat job takes (api/tools.py).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from api.bounds import INT32_MAX, MAX_OLLAMA_STOPS, JsonObject, WireModel, check_int, hosted_sampling, \
    stop_strings
from api.ollama_models import new_job_id
from common import clock
from common.errors import BadRequest
from common.images import checked as checked_image
from common.model_defaults import mark_given
from common.models import canonical_name
from common.protocol import ChatMessage, GenerationJob, Sampling
from common.thinking import Think, openai_effort
from common.tool_calls import ToolCall

if TYPE_CHECKING:
    from api.limits import RequestLimits

IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
BLOCK_FORMS = ('content blocks of type "text", "image", "tool_use", "tool_result", "thinking" and '
               '"redacted_thinking"')


def tool_use_id() -> str:
    return "toolu_" + secrets.token_hex(12)


class MessageIn(WireModel):
    role: Literal["user", "assistant"]
    content: str | list[JsonObject]


class ToolChoiceIn(WireModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingIn(WireModel):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = None  # taken, not enforced: vLLM's parsers have no thinking budget


class OutputFormatIn(WireModel):
    type: Literal["json_schema"]
    schema_: JsonObject = Field(alias="schema")


class OutputConfigIn(WireModel):
    effort: str | None = None  # low, medium, high, xhigh, max: how hard a model that takes levels thinks
    format: OutputFormatIn | None = None  # the answer follows this JSON schema


class CountTokensRequest(WireModel):
    model: str = ""
    messages: list[MessageIn] = Field(default_factory=list)
    system: str | list[JsonObject] | None = None
    tools: list[JsonObject] | None = None
    tool_choice: ToolChoiceIn | None = None
    thinking: ThinkingIn | None = None
    output_config: OutputConfigIn | None = None

    def canonical_model(self) -> str:
        if not self.model.strip():
            raise BadRequest("model: Field required")
        return canonical_name(self.model)

    def function_tools(self) -> list[dict[str, Any]] | None:
        """The tools as function tools (OpenAI's shape, which chat templates read)."""
        if not self.tools:
            return None
        tools = []
        for i, tool in enumerate(self.tools):
            kind = tool.get("type", "custom")
            if kind != "custom" or not isinstance(tool.get("name"), str) or not tool["name"]:
                raise BadRequest(f"tools[{i}] must be a client tool {{\"name\": ..., \"description\": ..., "
                                 f"\"input_schema\": {{...}}}}; server tools (type {kind!r}) are not supported")
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                raise BadRequest(f"tools[{i}].input_schema must be a JSON schema object")
            function = {"name": tool["name"], "parameters": schema}
            if isinstance(tool.get("description"), str):
                function["description"] = tool["description"]
            tools.append({"type": "function", "function": function})
        return tools

    def openai_tool_choice(self) -> tuple[Any, bool | None]:
        """(tool_choice, parallel) as api/tools.py takes them."""
        choice = self.tool_choice
        if choice is None:
            return None, None
        parallel = None if choice.disable_parallel_tool_use is None else not choice.disable_parallel_tool_use
        if choice.type == "tool":
            if not choice.name:
                raise BadRequest('tool_choice {"type": "tool"} needs "name": the tool to call')
            return {"type": "function", "function": {"name": choice.name}}, parallel
        return {"auto": "auto", "any": "required", "none": "none"}[choice.type], parallel

    def think(self) -> Think:
        """thinking "enabled": think; "disabled": do not; otherwise (adaptive, or not said) the
        model's default, or the level output_config.effort names."""
        if self.thinking is not None and self.thinking.type == "disabled":
            return False
        effort = self.output_config.effort if self.output_config is not None else None
        if effort is not None:
            try:
                return openai_effort(effort)
            except ValueError:
                raise BadRequest("output_config.effort must be one of low, medium, high, xhigh, max") from None
        return True if self.thinking is not None and self.thinking.type == "enabled" else None

    def chat_messages(self, limits: RequestLimits | None = None) -> list[ChatMessage]:
        """The conversation as the job's messages; ``limits`` bound its size and images."""
        if not self.messages:
            raise BadRequest("messages: at least one message is required")
        out: list[ChatMessage] = []
        system = self._system()
        if system:
            out.append(ChatMessage(role="system", content=system))
        tool_names: dict[str, str] = {}
        image_sizes: list[int] = []
        for i, message in enumerate(self.messages):
            blocks = [{"type": "text", "text": message.content}] if isinstance(message.content, str) \
                else message.content
            out.extend(_converted(message.role, blocks, f"messages[{i}]", tool_names, image_sizes))
        if limits is not None:
            limits.check_messages(len(out))
            limits.check_prompt([m.content + m.thinking for m in out], self.tools,
                                [c.arguments for m in out for c in m.tool_calls])
            limits.check_images(image_sizes)
        return out

    def _system(self) -> str:
        if self.system is None or isinstance(self.system, str):
            return self.system or ""
        texts = []
        for j, block in enumerate(self.system):
            if block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise BadRequest(f'system[{j}] must be a text block {{"type": "text", "text": "..."}}')
            texts.append(block["text"])
        return "\n\n".join(texts)


class MessagesRequest(CountTokensRequest):
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: JsonObject | None = None  # accepted and ignored, as user ids are elsewhere

    def to_job(self, limits: RequestLimits | None = None) -> GenerationJob:
        messages = self.chat_messages(limits)
        return GenerationJob(job_id=new_job_id(), model=self.canonical_model(), kind="chat", messages=messages,
                             think=self.think(), sampling=self._sampling(), created_at=clock.now())

    def _sampling(self) -> Sampling:
        if self.max_tokens is None:
            raise BadRequest("max_tokens: Field required")
        check_int("max_tokens", self.max_tokens, 1, INT32_MAX)
        s = hosted_sampling(self.temperature, self.top_p, max_temperature=1.0)
        s.max_tokens = self.max_tokens
        if self.top_k is not None:
            check_int("top_k", self.top_k, 0, INT32_MAX)
            s.top_k = self.top_k
        s.stop = stop_strings("stop_sequences", self.stop_sequences, MAX_OLLAMA_STOPS)
        if self.output_config is not None and self.output_config.format is not None:
            s.json_schema = self.output_config.format.schema_
        mark_given(s, self, {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                             "max_tokens": "max_tokens", "stop_sequences": "stop"})
        return s


def _converted(role: str, blocks: list[dict[str, Any]], where: str, tool_names: dict[str, str],
               image_sizes: list[int]) -> list[ChatMessage]:
    """One Anthropic message as chat messages: a user's tool results first (one tool message
    each), then what remains of the turn, if anything."""
    texts: list[str] = []
    thoughts: list[str] = []
    images: list[str] = []
    calls: list[ToolCall] = []
    results: list[ChatMessage] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = block.get("type")
        if kind == "text":
            texts.append(_string(block, "text", at))
        elif kind == "image" and role == "user":
            images.append(_image(block, at, image_sizes))
        elif kind == "tool_use" and role == "assistant":
            name, arguments = _string(block, "name", at), block.get("input", {})
            if not isinstance(arguments, dict):
                raise BadRequest(f"{at}.input must be a JSON object")
            call_id = block.get("id") if isinstance(block.get("id"), str) and block["id"] else tool_use_id()
            tool_names[call_id] = name
            calls.append(ToolCall(id=call_id, name=name, arguments=arguments))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, at, tool_names, image_sizes))
        elif kind == "thinking" and role == "assistant":
            thoughts.append(_string(block, "thinking", at))
        elif kind == "redacted_thinking" and role == "assistant":
            continue  # encrypted by another provider: nothing a local model can read
        else:
            shown = repr(kind) if isinstance(kind, str) and len(kind) <= 40 else "that type"
            raise BadRequest(f"{at}: blocks of type {shown} are not supported in a {role} message; send "
                             f"{BLOCK_FORMS} (tool_use and thinking from the assistant, images and tool_result "
                             "from the user)")
    out = results
    if texts or images or calls or thoughts or not results:
        out.append(ChatMessage(role=role, content="".join(texts), thinking="".join(thoughts), images=images,
                               tool_calls=calls))
    return out


def _tool_result(block: dict[str, Any], at: str, tool_names: dict[str, str], image_sizes: list[int]) -> ChatMessage:
    call_id = _string(block, "tool_use_id", at)
    content = block.get("content", "")
    texts, images = [], []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for k, part in enumerate(content):
            part_at = f"{at}.content[{k}]"
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(_string(part, "text", part_at))
            elif isinstance(part, dict) and part.get("type") == "image":
                images.append(_image(part, part_at, image_sizes))
            else:
                raise BadRequest(f"{part_at}: a tool result's content is text and image blocks")
    else:
        raise BadRequest(f"{at}.content must be a string or a list of text and image blocks")
    text = "".join(texts)
    if block.get("is_error") is True:
        text = f"Error: {text}"  # what the model must know; templates have no field for it
    return ChatMessage(role="tool", content=text, images=images, tool_call_id=call_id,
                       tool_name=tool_names.get(call_id))


def _image(block: dict[str, Any], at: str, image_sizes: list[int]) -> str:
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") != "base64":
        raise BadRequest(f'{at}: an image needs "source": {{"type": "base64", "media_type": "image/png", '
                         '"data": "..."}}; this server fetches {"type": "url"} sources only when '
                         "VLLAMA_FETCH_IMAGES is set")
    if source.get("media_type") not in IMAGE_TYPES:
        raise BadRequest(f"{at}.source.media_type must be one of {', '.join(IMAGE_TYPES)}")
    payload, size = checked_image(source.get("data"), f"{at}.source.data")
    image_sizes.append(size)
    return payload


def _string(block: dict[str, Any], field: str, at: str) -> str:
    value = block.get(field)
    if not isinstance(value, str):
        raise BadRequest(f'{at} needs "{field}": a string')
    return value
