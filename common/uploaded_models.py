"""What a set of uploaded files (/api/create's ``files``: name -> blob digest) can make.

Ollama's clients send either one GGUF file, or a safetensors model directory file by file
under its relative names (config.json, the weights, the tokenizer files). Which of the two,
and whether anything a loader needs is missing, is decided here from the names alone, by the
API before anything is queued and by the store again before it writes (the store never
trusts a job's arguments). Names are the client's: each must be a plain path inside the
model's directory (common/model_paths.py).
"""

from __future__ import annotations

from typing import Literal

from common.errors import BadRequest
from common.model_paths import path_problem

UploadKind = Literal["gguf", "safetensors"]
# Any one of these lets vLLM build the model's tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tiktoken.model")


def upload_kind(files: dict[str, str]) -> UploadKind:
    """``gguf`` or ``safetensors``; BadRequest saying what to send when the files are neither."""
    if not files:
        raise BadRequest('"files" is empty: give each uploaded file\'s name and digest, {"model.gguf": "sha256:..."}')
    for name in files:
        if (why := path_problem(name)) is not None:
            raise BadRequest(f'file name "{name[:100]}" is refused ({why}); name each file by its path '
                             "inside the model's directory, such as config.json or model.safetensors")
    ggufs = [n for n in files if n.lower().endswith(".gguf")]
    if ggufs:
        if len(files) > 1:
            raise BadRequest("send one GGUF file alone (a model made from a GGUF file takes everything from it); "
                             f"got {len(files)} files, {len(ggufs)} of them GGUF")
        return "gguf"
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if not any(n.endswith(".safetensors") for n in files):
        missing.append("the weights (*.safetensors)")
    if not any(n.rsplit("/", 1)[-1] in TOKENIZER_FILES for n in files):
        missing.append("the tokenizer (tokenizer.json, tokenizer.model or tokenizer_config.json)")
    if missing:
        raise BadRequest(f"the files cannot make a model: {', '.join(missing)} missing; send one .gguf file, or "
                         "every file of a safetensors model directory (config.json, *.safetensors, tokenizer files)")
    return "safetensors"
