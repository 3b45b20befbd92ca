"""Turns a model name into a directory vLLM can load.

The bundled model ships as GGUF inside a Python package; vLLM on CPU loads Hugging Face
safetensors, so it is converted once (about 25 s) into the model cache and reused after.
Conversion writes into a temporary directory and renames it into place, so a crash halfway
never leaves a directory that looks complete; a file lock keeps two workers on one machine
from converting at once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import shutil
from pathlib import Path

from common.errors import ModelNotFound
from common.models import canonical_name, source_for

log = logging.getLogger(__name__)


def cache_dir_name(model: str) -> str:
    return canonical_name(model).replace("/", "--").replace(":", "--")


def resolve_model_path(model: str, cache: Path) -> Path:
    """Local directory of ``model``, converting the bundled GGUF on first use."""
    name = canonical_name(model)
    target = cache / cache_dir_name(name)
    if (target / "config.json").exists():
        return target
    source = source_for(name)
    if source is None or source.bundled_gguf is None:
        raise ModelNotFound(name)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            _convert_gguf(source.bundled_gguf, target)
    return target


def _convert_gguf(bundled: str, target: Path) -> None:
    package, filename = bundled.split(":", 1)
    # find_spec locates the package without importing it: its __init__ needs a plugin host.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed; run scripts/install.sh")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / filename).exists():
        raise FileNotFoundError(f"{filename} not found in package {package}; reinstall it")
    log.info("converting %s to safetensors in %s (once)", filename, target)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename)
    # The weights are dequantized on load; the GGUF quantization config would make
    # save_pretrained (and later vLLM) expect quantized tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
