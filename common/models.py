"""Model names: Ollama-style ``name:tag`` or a Hugging Face repo id, resolved to one canonical
name that keys the model's queue, its manifest file and its cache directory.

Ollama names resolve through the alias table in ``model_aliases.json``, kept as data so that
adding a model is a one-line change reviewed without reading code. Any Hugging Face repo id
(``org/name``, optionally ``org/name@revision``) works as well, without an alias.

A name reaches file paths, so validation is strict: only ASCII letters, digits, ``.``, ``_``
and ``-`` in each part, at most one ``/`` (the org/name separator), no ``..``, bounded length.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from urllib.parse import quote, unquote

from common.errors import BadRequest

DEFAULT_TAG = "latest"
DEFAULT_REVISION = "main"
# Leaves room for the encoding of store_filename and a suffix within a 255-byte file name.
MAX_NAME_LENGTH = 200

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
# org/name or org/name@revision; a revision is a branch, tag or commit (no '/', at most 64 chars).
_REPO_ID = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}))?")
# name, name:tag, or namespace/name:tag (a namespace without a tag is a repo id).
_OLLAMA_NAME = re.compile(rf"(?:{_PART}/)?{_PART}(?::{_PART})?")
# Ollama's spellings of its own library; `library/x` is `x`.
_OLLAMA_PREFIXES = ("registry.ollama.ai/library/", "ollama.com/library/", "library/")
# Ollama's spelling of a Hugging Face repo.
_HF_PREFIXES = ("hf.co/", "huggingface.co/")
_STORE_FILENAME = re.compile(r"[A-Za-z0-9._%-]+")

_VALID_NAMES = (
    "use name:tag (for example llama3.2:3b) or a Hugging Face repo id "
    "(org/name or org/name@revision): letters, digits, '.', '_' and '-'"
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, and what is known about them before downloading."""

    hf_repo: str  # the upstream Hugging Face repo (tokenizer/config identity)
    # "package:file" of a model shipped in a Python package: a GGUF file, or a zip of a
    # Hugging Face model directory. It is imported, never downloaded.
    bundled: str | None = None
    chat_template: str | None = None  # a file in common/chat_templates/ replacing the GGUF's template
    revision: str = DEFAULT_REVISION
    parameter_size: str | None = None  # Ollama style: "8.0B", "135M"
    size_bytes: int | None = None  # download size of the published safetensors weights
    context_length: int | None = None
    family: str | None = None  # the config's model_type: llama, qwen2, gemma3, ...
    gated: bool = False  # the repo asks for a license agreement: pulling needs HF_TOKEN
    embedding: bool = False  # an embedding model (before its files say so)


def _invalid(name: str, why: str = "") -> BadRequest:
    shown = name if len(name) <= 80 else name[:80] + "..."
    return BadRequest(f"invalid model name {shown!r}{why}: {_VALID_NAMES}")


def _strip_prefix(name: str, prefixes: tuple[str, ...]) -> str | None:
    lowered = name.lower()
    for prefix in prefixes:
        if lowered.startswith(prefix):
            return name[len(prefix):]
    return None


def canonical_name(name: str) -> str:
    """``smollm2`` becomes ``smollm2:latest``; ``Llama3.1:8B`` becomes ``llama3.1:8b`` (Ollama
    names are case-insensitive); repo ids ``org/name`` and ``org/name@rev`` stay as given (their
    spelling is kept; ``name_key`` matches them without regard to case, as the Hub does).
    ``library/x:tag`` and ``registry.ollama.ai/library/x:tag`` are ``x:tag``; ``hf.co/org/name``
    is ``org/name``.

    Raises BadRequest, saying what a valid name looks like, for anything else: that is the
    guarantee that lets a canonical name be used in file names.
    """
    if not isinstance(name, str):
        raise BadRequest(f"model must be a string: {_VALID_NAMES}")
    name = name.strip()
    if not name:
        raise BadRequest("model is required")
    if len(name) > MAX_NAME_LENGTH:
        raise _invalid(name, f" (longer than {MAX_NAME_LENGTH} characters)")
    if ".." in name:
        raise _invalid(name)
    if (rest := _strip_prefix(name, _OLLAMA_PREFIXES)) is not None:
        if "/" in rest:
            raise _invalid(name)
        name = rest
    elif (rest := _strip_prefix(name, _HF_PREFIXES)) is not None:
        if not _REPO_ID.fullmatch(rest):
            raise _invalid(name, " (a Hugging Face repo is org/name; quantization tags are not supported)")
        return rest
    if _REPO_ID.fullmatch(name):
        return name
    if not _OLLAMA_NAME.fullmatch(name):
        raise _invalid(name)
    canonical = (name if ":" in name else f"{name}:{DEFAULT_TAG}").lower()
    if len(canonical) > MAX_NAME_LENGTH:
        raise _invalid(name, f" (longer than {MAX_NAME_LENGTH} characters)")
    return canonical


def _load_table() -> tuple[dict[str, ModelSource], dict[str, ModelSource]]:
    """Read the alias table once; a malformed entry fails the import, not a request later."""
    text = resources.files("common").joinpath("model_aliases.json").read_text(encoding="utf-8")
    data = json.loads(text)
    models: dict[str, ModelSource] = {}
    for name, entry in data["models"].items():
        if canonical_name(name) != name or ":" not in name:
            raise ValueError(f"model_aliases.json: {name!r} is not a canonical name:tag")
        if not _REPO_ID.fullmatch(entry["repo"]) or "@" in entry["repo"]:
            raise ValueError(f"model_aliases.json: {name!r} has no org/name repo")
        models[name] = ModelSource(
            hf_repo=entry["repo"],
            bundled=entry.get("bundled"),
            chat_template=entry.get("chat_template"),
            revision=entry.get("revision", DEFAULT_REVISION),
            parameter_size=entry["parameter_size"],
            size_bytes=entry["size_bytes"],
            context_length=entry["context_length"],
            family=entry["family"],
            gated=entry.get("gated", False),
            embedding=entry.get("embedding", False),
        )
    aliases = dict(models)
    for name, target in data["aliases"].items():
        if canonical_name(name) != name or target not in models or name in models:
            raise ValueError(f"model_aliases.json: alias {name!r} -> {target!r} is not a new name for a model")
        aliases[name] = models[target]
    return models, aliases


MODELS: dict[str, ModelSource]  # one entry per repo, under its tagged name (llama3.1:8b)
ALIASES: dict[str, ModelSource]  # every Ollama name we know (MODELS plus llama3.1:latest, ...)
MODELS, ALIASES = _load_table()


def is_repo_id(name: str) -> bool:
    """Whether a canonical name is a Hugging Face repo id rather than an Ollama name."""
    return _REPO_ID.fullmatch(name) is not None


def name_key(name: str) -> str:
    """What every spelling of one model has in common. The Hub matches repo ids without regard
    to case (``QWEN/x`` is ``Qwen/x``), so a repo id's key is its lower case (a revision keeps
    its case: branch names are case-sensitive); Ollama names are lower case already."""
    name = canonical_name(name)
    if (match := _REPO_ID.fullmatch(name)) is None:
        return name
    return match["repo"].lower() + (f"@{match['revision']}" if match["revision"] else "")


def same_model(a: str, b: str) -> bool:
    return name_key(a) == name_key(b)


def with_repo_spelling(name: str, repo: str) -> str:
    """``name`` (a repo id, perhaps with a revision) spelt as the Hub spells ``repo``, when they
    name the same repo; anything else unchanged."""
    match = _REPO_ID.fullmatch(name)
    if match is None or match["repo"].lower() != repo.lower():
        return name
    return repo + (f"@{match['revision']}" if match["revision"] else "")


def is_alias(name: str) -> bool:
    """Whether ``name`` is in the alias table (what auto-pull may fetch by default)."""
    return canonical_name(name) in ALIASES


def source_for(name: str) -> ModelSource | None:
    """The source of an alias or of a repo id; None for an Ollama name not in the table."""
    name = canonical_name(name)
    if source := ALIASES.get(name):
        return source
    if match := _REPO_ID.fullmatch(name):
        return ModelSource(hf_repo=match["repo"], revision=match["revision"] or DEFAULT_REVISION)
    return None


def store_filename(name: str) -> str:
    """A file name for the model's manifest: one per canonical name, reversible, and unable to
    name anything but a plain file in the directory it is joined to (no '/', never '.' or '..')."""
    encoded = quote(canonical_name(name), safe="")
    if encoded.startswith("."):  # not reachable from a canonical name today; cheap to keep so
        encoded = "%2E" + encoded[1:]
    return encoded


def name_from_store_filename(filename: str) -> str:
    """The canonical name stored under ``filename``; ValueError for a file this module did not
    name (a stray file in the cache is skipped, not guessed at)."""
    if not _STORE_FILENAME.fullmatch(filename):
        raise ValueError(f"not a model file name: {filename!r}")
    name = unquote(filename)
    try:
        if store_filename(name) != filename:
            raise ValueError(f"not a model file name: {filename!r}")
    except BadRequest as exc:
        raise ValueError(f"not a model file name: {filename!r}") from exc
    return name


def pull_hint(name: str) -> str:
    """The command that downloads ``name`` into vLLama (the Ollama CLI talks to it unchanged)."""
    return f"ollama pull {canonical_name(name)}"
