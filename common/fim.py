"""Fill-in-the-middle: Ollama's ``suffix``, for models trained to write what goes between a
prefix and a suffix (code completion in an editor).

A model can do it when its vocabulary has the special tokens of one of the formats below:
the worker writes the prompt in that format instead of the chat template, and /api/show lists
the ``insert`` capability. Each format is the one its model family was trained with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class FimFormat:
    prefix: str
    suffix: str
    middle: str = ""  # suffix-first formats (Codestral's) have no middle marker
    suffix_first: bool = False

    def prompt(self, before: str, after: str) -> str:
        """The text whose continuation is what goes between ``before`` and ``after``."""
        if self.suffix_first:
            return f"{self.suffix}{after}{self.prefix}{before}{self.middle}"
        return f"{self.prefix}{before}{self.suffix}{after}{self.middle}"

    def markers(self) -> tuple[str, ...]:
        return tuple(m for m in (self.prefix, self.suffix, self.middle) if m)


FORMATS = (
    FimFormat("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeGemma
    FimFormat("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, Granite Code
    FimFormat("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
    FimFormat("[PREFIX]", "[SUFFIX]", suffix_first=True),  # Codestral
)


def fim_format(vocabulary: Iterable[str]) -> FimFormat | None:
    """The format whose markers are all tokens of ``vocabulary``; None: the model cannot fill in."""
    tokens = set(vocabulary)
    return next((f for f in FORMATS if all(m in tokens for m in f.markers())), None)
