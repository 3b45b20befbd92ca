"""Thinking out of a streaming answer, with vLLM's reasoning parsers.

``ThinkingSplitter`` sits between the engine's deltas and the rest of the answer's path: the
parser the model's chat template names (common/thinking.py) says, piece by piece, which text
is reasoning (sent at once in thinking frames) and which is the answer (handed on: to the
tool-call splitter when the request has tools, else straight to the client). Reasoning
parsers read token ids as well as text, so the splitter keeps both, as vLLM's server does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from common.model_info import chat_templates
from common.thinking import Think, reasoning_parser_for, template_kwargs

log = logging.getLogger(__name__)


def fitting_parser(model_dir: Path) -> str | None:
    """The reasoning parser the model's chat template names, if it can read this model's
    tokenizer: a template may mention markers its vocabulary lacks, and vLLM's engine, which
    uses the parser to hold back a JSON schema until the thinking ends, must not get one
    that fails."""
    name = reasoning_parser_for(chat_templates(model_dir))
    if name is None:
        return None
    try:
        from transformers import AutoTokenizer
        from vllm.reasoning import ReasoningParserManager

        ReasoningParserManager.get_reasoning_parser(name)(AutoTokenizer.from_pretrained(model_dir))
    except Exception:  # noqa: BLE001 - any failure means the same: the model is served as one that does not think
        log.warning("the %s reasoning parser its template names does not fit %s: served as a model that does not "
                    "think", name, model_dir.name, exc_info=True)
        return None
    return name


class ThinkingSplitter:
    def __init__(self, parser: str, think: Think, levels: bool, tokenizer: Any, prompt_ids: list[int]) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.reasoning import ReasoningParserManager

        self.parser_name = parser
        # The parser is told what the template was told: with thinking off, Qwen3's expects
        # the answer at once.
        self._parser = ReasoningParserManager.get_reasoning_parser(parser)(
            tokenizer, chat_template_kwargs=template_kwargs(think, levels))
        # A template may open the think block itself (DeepSeek-R1's, Qwen3-Thinking's).
        self._parser.adjust_initial_state_from_prompt(prompt_ids)
        self._request = self._parser.adjust_request(ChatCompletionRequest(model="-", messages=[]))
        end = self._parser.reasoning_end_str
        self._end_id = self._parser.vocab.get(end) if end else None  # None: the end is text, not a token
        self._text = ""
        self._token_ids: list[int] = []
        self._failed = False
        self._reasoned = False  # whether any reasoning came yet

    @property
    def skip_special_tokens(self) -> bool:
        """False when the markers are special tokens the parser must see in the text."""
        return self._request.skip_special_tokens

    def feed(self, text: str, token_ids: list[int]) -> tuple[str, str, list[int]]:
        """Take the next piece of the answer: (its reasoning, its content, the content's token
        ids as far as they can be told apart)."""
        previous, previous_ids = self._text, self._token_ids
        self._text += text
        self._token_ids = previous_ids + list(token_ids)
        if self._failed:
            return "", text, list(token_ids)
        try:
            delta = self._parser.extract_reasoning_streaming(
                previous, self._text, text, previous_ids, self._token_ids, list(token_ids))
        except Exception:  # noqa: BLE001 - a parser bug must not fail the answer: the rest is content
            log.warning("reasoning parser %s failed on a streamed piece", self.parser_name, exc_info=True)
            self._failed = True
            return "", text, list(token_ids)
        if delta is None:  # a marker alone
            return "", "", []
        reasoning, content = delta.reasoning or "", delta.content or ""
        # A piece that starts with the start marker and goes on (a consumer that fell behind
        # gets several tokens at once) comes back with the marker in the reasoning.
        start = self._parser.reasoning_start_str
        if not self._reasoned and start and reasoning.startswith(start):
            reasoning = reasoning[len(start):]
        self._reasoned = self._reasoned or bool(reasoning)
        return reasoning, content, self._content_ids(token_ids) if content else []

    def _content_ids(self, token_ids: list[int]) -> list[int]:
        """The ids of a piece's content: all of them, or, where reasoning ended in this piece,
        those after its end marker (parsers whose end is text, not a token, give none)."""
        if self._end_id is not None and self._end_id in token_ids:
            return token_ids[len(token_ids) - token_ids[::-1].index(self._end_id):]
        return list(token_ids)
