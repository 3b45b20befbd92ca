"""Tool calls out of a streaming answer, with vLLM's tool parsers.

``ToolCallSplitter`` sits between the engine's deltas and the job's frames. With tool_choice
"auto" the model's own format is read by the vLLM parser the API named: while the answer
streams, the parser's streaming mode says which text is content (sent at once) and holds
back what belongs to a call; when the answer is complete, the parser's whole-text mode
extracts the calls, each sent whole (Ollama sends whole calls too, and OpenAI clients
accept a call in one delta). With a required call, the answer is JSON constrained by a
schema (common/tool_calls.py): nothing is content, and the JSON becomes the calls.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from common.tool_calls import ToolCall, ToolUse, forced_calls

log = logging.getLogger(__name__)


class ToolCallSplitter:
    def __init__(self, use: ToolUse, tokenizer: Any) -> None:
        self.use = use
        self.text = ""
        self._token_ids: list[int] = []
        self._sent = ""  # content sent so far
        self._parser = self._request = None
        if use.choice == "auto":
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
            from vllm.tool_parsers import ToolParserManager

            request = ChatCompletionRequest(model="-", messages=[], tools=use.tools, tool_choice="auto")
            self._parser = ToolParserManager.get_tool_parser(use.parser)(tokenizer, tools=request.tools)
            # Parsers whose markers are special tokens ask for them to be kept in the text.
            self._request = self._parser.adjust_request(request)

    @property
    def skip_special_tokens(self) -> bool:
        return self._request is None or self._request.skip_special_tokens

    def feed(self, text: str, token_ids: list[int]) -> str:
        """Take the next piece of the answer; returns the content that can be sent now."""
        previous, previous_ids = self.text, self._token_ids
        self.text += text
        self._token_ids = previous_ids + list(token_ids)
        if self._parser is None:
            return ""  # a required call: all of it is the call's JSON
        try:
            delta = self._parser.extract_tool_calls_streaming(
                previous, self.text, text, previous_ids, self._token_ids, list(token_ids), self._request)
        except Exception:  # noqa: BLE001 - a parser bug must not fail the answer: finish() decides
            log.warning("tool parser %s failed on a streamed piece", self.use.parser, exc_info=True)
            return ""
        content = (delta.content or "") if delta is not None else ""
        self._sent += content
        return content

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not sent yet, the calls), once the answer is complete."""
        if self._parser is None:
            calls = forced_calls(self.use, self.text)
            return ("", calls) if calls else (self.text, [])  # cut short: the text as it is
        calls: list[ToolCall] = []
        content = self.text
        try:
            found = self._parser.extract_tool_calls(self.text, self._request)
            if found.tools_called:
                calls = [c for c in map(_tool_call, found.tool_calls) if c is not None]
                content = (found.content or "") if calls else self.text
        except Exception:  # noqa: BLE001 - unparseable calls stay text, as vLLM's server does
            log.warning("tool parser %s failed on an answer", self.use.parser, exc_info=True)
        # What streamed is a prefix of the content unless the parser changed its mind.
        rest = content[len(self._sent):] if content.startswith(self._sent) else ""
        return rest, calls


def _tool_call(call: Any) -> ToolCall | None:
    """vLLM's call (arguments as JSON text) as ours; None unless the arguments are an object."""
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except ValueError:
        return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=call.function.name, arguments=arguments)
