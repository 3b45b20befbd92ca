"""What Ollama's /api/tags, /api/show and /api/ps say about a model, read from its directory.

A pulled model is a Hugging Face directory (``config.json``, tokenizer files, ``*.safetensors``).
``describe`` runs once per pull or import and its result is stored as JSON, so listing and showing
models never needs the engine or the weights. It parses JSON and safetensors headers only: no
tensor is read, and nothing from the directory is imported or executed (it is untrusted input).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from common.fim import fim_format
from common.thinking import reasoning_parser_for
from common.tool_calls import tool_parser_for

LICENSE_LIMIT = 64 * 1024
_MAX_HEADER = 100 * 1024 * 1024  # a larger header means a corrupt or non-safetensors file
_DTYPE_LEVEL = {"F8_E4M3": "FP8", "F8_E5M2": "FP8"}  # other safetensors dtypes are Ollama's names
_TORCH_DTYPE = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}
_FILE_TYPE = {"F32": 0, "F16": 1, "BF16": 32}  # GGUF's file-type numbers, which Ollama reports
# Quantization bookkeeping (scales, zero points, group indices, bitsandbytes state) is not a
# parameter of the model: it is left out of the count when the config declares a quantization.
_QUANT_AUX = re.compile(
    r"(\.qzeros|\.scales|\.g_idx|_scale|_scale_inv|_zero_point|_shape|_g_idx|\.absmax|\.quant_map"
    r"|\.nested_absmax|\.nested_quant_map|\.quant_state\..*|\.SCB|\.weight_format)$"
)
_SUBCONFIGS = ("text_config", "llm_config", "language_config")
_SAMPLING = (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
             ("min_p", "min_p"), ("repetition_penalty", "repeat_penalty"))


class ModelDetails(BaseModel):
    """Ollama's ``details`` object, field for field."""

    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class ModelDescription(BaseModel):
    """Everything the API reports about a model without loading it."""

    details: ModelDetails
    parameter_count: int
    size_bytes: int
    context_length: int
    embedding_length: int
    architecture: str
    model_info: dict[str, Any]
    template: str
    parameters: str
    capabilities: list[str]
    license: str
    tool_parser: str | None = None  # the vLLM tool parser for the calls its template teaches
    # What /api/create gave a model made from another (common/model_defaults.py): its system
    # prompt, the messages that open every chat, and its default options (Ollama's names).
    system: str = ""
    messages: list[dict[str, Any]] = []
    options: dict[str, Any] = {}
    # An Ollama (Go) template it was created with, used instead of its chat template
    # (common/ollama_templates.py); "" for none.
    prompt_template: str = ""
    # A vision model's image encoder, in Ollama's ``clip.*`` keys (/api/show's projector_info).
    projector_info: dict[str, Any] = {}


def human_number(n: int) -> str:
    """Ollama's ``format.HumanNumber``, so sizes read as Ollama's do (``8.0B``, ``134.52M``)."""
    for scale, suffix, decimals in ((1_000_000_000, "B", 1), (1_000_000, "M", 2)):
        if n >= scale:
            value = n / scale
            return f"{value:.{0 if value == math.floor(value) else decimals}f}{suffix}"
    return f"{n / 1000:.0f}K" if n >= 1000 else str(n)


def _read_json(path: Path, required: bool = False) -> Any:
    """Parse a JSON file; a broken one means a broken pull, so it is an error naming the file."""
    if not path.is_file():
        if required:
            raise ValueError(f"{path}: not found; a model directory needs a config.json")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _object(value: Any) -> dict[str, Any]:
    """JSON that is valid but not an object is treated as absent."""
    return value if isinstance(value, dict) else {}


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file: an 8-byte little-endian length, then that much JSON."""
    try:
        with path.open("rb") as f:
            raw, size = f.read(8), os.fstat(f.fileno()).st_size
            length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if length < 2 or length > min(size - 8, _MAX_HEADER):
                raise ValueError(f"{path}: not a safetensors file (header length {length}, size {size})")
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header


def _safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files a loader would use: the index's shards, else ``model*``, else all."""
    index_path = model_dir / "model.safetensors.index.json"
    weight_map = _object(_read_json(index_path)).get("weight_map")
    if isinstance(weight_map, dict):
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        if missing := [f.name for f in files if not f.is_file()]:
            raise ValueError(f"{index_path}: lists shards that are missing: {missing}")
        return files
    found = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    return [p for p in found if p.name.startswith("model")] or found


def _count_parameters(files: list[Path], configs: list[dict[str, Any]],
                      quant: dict[str, Any]) -> tuple[int, Counter[str]]:
    """Sum of the tensors' element counts, and elements per dtype.

    Tied embeddings count once even if a checkpoint also stores ``lm_head``; packed quantized
    weights (several 4-bit values per int32 or uint8) count as the values they hold.
    """
    tied = any(c.get("tie_word_embeddings") is True for c in configs)
    bits, _ = _quant_weights(quant)
    total, by_dtype = 0, Counter[str]()
    for path in files:
        for name, info in _safetensors_header(path).items():
            if not isinstance(info, dict) or (tied and name.endswith("lm_head.weight")):
                continue
            if quant and _QUANT_AUX.search(name):
                continue
            dtype, elements = str(info.get("dtype")), math.prod(int(d) for d in info.get("shape", []))
            by_dtype[dtype] += elements
            if bits and dtype == "I32" and name.endswith((".qweight", ".weight_packed")):
                elements *= 32 // bits
            elif quant.get("load_in_4bit") and dtype == "U8" and name.endswith(".weight"):
                elements *= 2
            total += elements
    return total, by_dtype


def _quant_weights(quant: dict[str, Any]) -> tuple[int, str]:
    """(bits, "int" or "float") of the quantized weights, from AWQ/GPTQ or compressed-tensors keys."""
    bits, kind = quant.get("bits") or quant.get("w_bit"), "int"
    for group in _object(quant.get("config_groups")).values():
        weights = _object(_object(group).get("weights"))
        bits, kind = bits or weights.get("num_bits"), weights.get("type") or kind
    return (bits if isinstance(bits, int) and bits > 0 else 0), str(kind)


def _quant_level(quant: dict[str, Any]) -> str:
    """A short label for a declared quantization, in the spirit of Ollama's ``Q4_K_M``."""
    method = str(quant.get("quant_method") or "quantized").upper()
    bits, kind = _quant_weights(quant)
    if method.startswith("FP8") or (kind == "float" and bits == 8):
        return "FP8"
    return f"{method}-INT{bits}" if bits else method


def _pick(configs: list[dict[str, Any]], *keys: str) -> Any:
    """The first number found; the language model's sub-config comes first, as Ollama reports it."""
    for cfg in configs:
        for key in keys:
            if isinstance(cfg.get(key), (int, float)) and not isinstance(cfg[key], bool):
                return cfg[key]
    return None


def _rope_theta(configs: list[dict[str, Any]]) -> float | None:
    """``rope_theta``, or its newer home ``rope_parameters`` (possibly one per attention type)."""
    theta = _pick(configs, "rope_theta", "rotary_emb_base")
    for cfg in configs if theta is None else []:
        params = _object(cfg.get("rope_parameters"))
        if (theta := _pick([_object(params.get("full_attention")) or params], "rope_theta")) is not None:
            break
    return theta


def _template(model_dir: Path, tokenizer_config: dict[str, Any]) -> tuple[str, str]:
    """(the default template, all template texts): tools may be only in a named ``tool_use`` one."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        text = jinja.read_text(encoding="utf-8", errors="replace")
        return text, text
    raw = _object(_read_json(model_dir / "chat_template.json")).get("chat_template")
    raw = raw if raw is not None else tokenizer_config.get("chat_template")
    if isinstance(raw, list):
        named = {t.get("name"): str(t.get("template") or "") for t in raw if isinstance(t, dict)}
        return named.get("default", next(iter(named.values()), "")), "\n".join(named.values())
    return (raw, raw) if isinstance(raw, str) else ("", "")


def chat_templates(model_dir: Path) -> str:
    """All of a model's chat template texts: what says whether it thinks, and how it calls tools."""
    return _template(model_dir, _object(_read_json(model_dir / "tokenizer_config.json")))[1]


# Encoder-only architectures: they embed text and generate none.
_ENCODER_SUFFIXES = ("BertModel", "RobertaModel", "XLMRobertaModel", "ModernBertModel", "GteModel")


def is_embedding_model(model_dir: Path, config: dict[str, Any] | None = None) -> bool:
    """A sentence-transformers model (its modules.json names a pooling step: some are built on
    a causal LM, as Qwen3-Embedding is), or an encoder-only architecture (BERT and kin). The
    worker runs such a model with vLLM's pooling runner."""
    if config is None:
        config = _object(_read_json(model_dir / "config.json"))
    modules = _read_json(model_dir / "modules.json")
    if isinstance(modules, list) and any(isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling")
                                         for m in modules):
        return True
    architectures = config.get("architectures")
    return isinstance(architectures, list) and any(isinstance(a, str) and a.endswith(_ENCODER_SUFFIXES)
                                                   for a in architectures)


def _capabilities(config: dict[str, Any], templates: str, embedding: bool, special_tokens: Iterable[str]) -> list[str]:
    if embedding:
        return ["embedding"]
    caps = ["completion"]
    if tool_parser_for(templates):  # rendered tools are no use unless the calls can be read back
        caps.append("tools")
    if fim_format(special_tokens):  # as the worker decides it, from the vocabulary (common/fim.py)
        caps.append("insert")
    if isinstance(config.get("vision_config"), dict):
        caps.append("vision")
    if reasoning_parser_for(templates):  # as the worker decides it (workers/generation.py)
        caps.append("thinking")
    return caps


def _token_strings(model_dir: Path, tokenizer_config: dict[str, Any]) -> dict[int, str]:
    """Special-token ids to text; ``tokenizer.json`` is parsed only if the config lacks them."""
    decoder = _object(tokenizer_config.get("added_tokens_decoder"))
    entries = [{**_object(v), "id": int(k)} for k, v in decoder.items() if str(k).isdigit()]
    if not entries:
        entries = _object(_read_json(model_dir / "tokenizer.json")).get("added_tokens") or []
    return {e["id"]: e["content"] for e in entries
            if isinstance(e, dict) and isinstance(e.get("id"), int) and isinstance(e.get("content"), str)}


def _go_value(value: Any) -> str:
    """Go's ``%#v`` of an option value, as Ollama prints it: quoted strings, ``1`` for ``1.0``."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    text = repr(value)
    return text[:-2] if isinstance(value, float) and text.endswith(".0") else text


def _parameters(model_dir: Path, config: dict[str, Any], generation: dict[str, Any],
                tokenizer_config: dict[str, Any]) -> str:
    """Ollama's ``parameters`` text: sampling defaults, then a ``stop`` line per EOS token."""
    lines = [(key, generation[hf_key]) for hf_key, key in _SAMPLING
             if isinstance(generation.get(hf_key), (int, float)) and not isinstance(generation[hf_key], bool)]
    ids = generation.get("eos_token_id")
    ids = config.get("eos_token_id") if ids is None else ids
    ids = [i for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int)]
    table = _token_strings(model_dir, tokenizer_config) if ids else {}
    eos = tokenizer_config.get("eos_token")
    eos = _object(eos).get("content") if isinstance(eos, dict) else eos
    stops = [table[i] for i in ids if i in table] + ([eos] if isinstance(eos, str) and eos else [])
    lines += [("stop", stop) for stop in dict.fromkeys(stops)]
    return "\n".join(f"{key:<30} {_go_value(value)}" for key, value in lines)


def _directory_size(model_dir: Path) -> int:
    """Bytes of the files, following links (a cache snapshot links to blobs), each file once."""
    seen, total = set(), 0
    for root, _, files in os.walk(model_dir):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue  # a dangling link is not part of the model
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _license(model_dir: Path) -> str:
    for path in sorted(model_dir.iterdir()):
        if path.name.lower() in ("license", "license.txt", "license.md") and path.is_file():
            with path.open("rb") as f:
                return f.read(LICENSE_LIMIT).decode("utf-8", errors="ignore")
    return ""


def describe(model_dir: Path) -> ModelDescription:
    """Describe a local Hugging Face model directory; ValueError if it is not a usable one."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: not a directory")
    config = _read_json(model_dir / "config.json", required=True)
    if not isinstance(config, dict):
        raise ValueError(f"{model_dir / 'config.json'}: not a JSON object")
    generation = _object(_read_json(model_dir / "generation_config.json"))
    tokenizer_config = _object(_read_json(model_dir / "tokenizer_config.json"))
    configs = [*(config[k] for k in _SUBCONFIGS if isinstance(config.get(k), dict)), config]
    quant = _object(config.get("quantization_config"))
    dtype = next((c.get(k) for c in configs for k in ("torch_dtype", "dtype") if c.get(k)), None)
    dtype_level, dtype_bytes = _TORCH_DTYPE.get(str(dtype), ("F32", 4))

    if weights := _safetensors_files(model_dir):
        fmt = "safetensors"
        count, by_dtype = _count_parameters(weights, configs, quant)
        top = by_dtype.most_common(1)[0][0] if by_dtype else dtype_level
        level = _DTYPE_LEVEL.get(top, top)
    else:  # no headers to read: estimate from the weight files' size and the declared dtype
        gguf = list(model_dir.glob("*.gguf"))
        fmt = "gguf" if gguf else "pytorch"
        blobs = [p for ext in ("*.bin", "*.pt", "*.pth") for p in model_dir.glob(ext)]
        count = 0 if gguf else sum(p.stat().st_size for p in blobs) // dtype_bytes
        level = dtype_level
    if quant:
        level = _quant_level(quant)

    family = str(config.get("model_type") or "")
    context = _pick(configs, "max_position_embeddings", "n_positions", "max_sequence_length",
                    "seq_length", "n_ctx")
    embedding = _pick(configs, "hidden_size", "n_embd", "d_model")
    heads = _pick(configs, "num_attention_heads", "n_head", "num_heads")
    info: dict[str, Any] = {"general.architecture": family, "general.parameter_count": count}
    if level in _FILE_TYPE:
        info["general.file_type"] = _FILE_TYPE[level]
    for key, value in (
        ("context_length", context),
        ("embedding_length", embedding),
        ("block_count", _pick(configs, "num_hidden_layers", "n_layer", "num_layers")),
        ("attention.head_count", heads),
        ("attention.head_count_kv", _pick(configs, "num_key_value_heads", "num_kv_heads") or heads),
        ("attention.key_length", _pick(configs, "head_dim")),
        ("attention.layer_norm_rms_epsilon", _pick(configs, "rms_norm_eps")),
        ("feed_forward_length", _pick(configs, "intermediate_size", "n_inner", "ffn_dim")),
        ("expert_count", _pick(configs, "num_local_experts", "num_experts", "n_routed_experts")),
        ("expert_used_count", _pick(configs, "num_experts_per_tok")),
        ("rope.freq_base", _rope_theta(configs)),
        ("vocab_size", _pick(configs, "vocab_size")),
    ):
        if value is not None:
            info[f"{family}.{key}"] = value

    architectures = config.get("architectures")
    template, all_templates = _template(model_dir, tokenizer_config)
    embedding_model = is_embedding_model(model_dir, config)
    if embedding_model:  # what it was trained on, and what vLLM uses, when it says
        context = _object(_read_json(model_dir / "sentence_bert_config.json")).get("max_seq_length") or context
    return ModelDescription(
        details=ModelDetails(format=fmt, family=family, families=[family],
                             parameter_size=human_number(count), quantization_level=level),
        parameter_count=count,
        size_bytes=_directory_size(model_dir),
        context_length=int(context or 0),
        embedding_length=int(embedding or 0),
        architecture=str(architectures[0]) if isinstance(architectures, list) and architectures else "",
        model_info=info,
        template=template,
        parameters=_parameters(model_dir, config, generation, tokenizer_config),
        capabilities=_capabilities(config, all_templates, embedding_model,
                                   _token_strings(model_dir, tokenizer_config).values()),
        license=_license(model_dir),
        tool_parser=tool_parser_for(all_templates),
        projector_info=_projector_info(config),
    )


def _projector_info(config: dict[str, Any]) -> dict[str, Any]:
    """A vision model's encoder as Ollama describes its projector; {} for any other model."""
    vision = _object(config.get("vision_config"))
    if not vision:
        return {}
    info: dict[str, Any] = {"clip.has_vision_encoder": True}
    for key, value in (("clip.vision.embedding_length", _pick([vision], "hidden_size", "embed_dim")),
                       ("clip.vision.block_count", _pick([vision], "num_hidden_layers", "depth")),
                       ("clip.vision.attention.head_count", _pick([vision], "num_attention_heads", "num_heads")),
                       ("clip.vision.feed_forward_length", _pick([vision], "intermediate_size")),
                       ("clip.vision.image_size", _pick([vision], "image_size")),
                       ("clip.vision.patch_size", _pick([vision], "patch_size"))):
        if value is not None:
            info[key] = value
    return info


def tensors(model_dir: Path) -> list[dict[str, Any]]:
    """Every weight tensor's name, type and shape, read from the safetensors headers (what
    /api/show lists with ``verbose``); [] for weights in other formats."""
    found = []
    for path in _safetensors_files(Path(model_dir)):
        for name, info in sorted(_safetensors_header(path).items()):
            if isinstance(info, dict):
                found.append({"name": name, "type": str(info.get("dtype", "")), "shape": list(info.get("shape", []))})
    return found


def _quote(text: str) -> str:
    """Ollama's Modelfile quoting: bare, in ``"``, or in triple quotes, as the text needs."""
    if "\n" in text or text.startswith(" ") or text.endswith(" "):
        return f'"""{text}"""' if '"' in text else f'"{text}"'
    return text


def modelfile(name: str, description: ModelDescription) -> str:
    """The ``modelfile`` text of /api/show, laid out like Ollama's (the template stays Jinja)."""
    lines = ['# Modelfile generated by "ollama show"',
             "# To build a new Modelfile based on this, replace FROM with:", f"# FROM {name}", "",
             f"FROM {name}"]
    if description.prompt_template or description.template:
        lines.append(f"TEMPLATE {_quote(description.prompt_template or description.template)}")
    if description.system:
        lines.append(f"SYSTEM {_quote(description.system)}")
    for line in description.parameters.splitlines():
        key, _, value = line.partition(" ")
        value = value.strip()
        value = json.loads(value) if value.startswith('"') else value
        lines.append(f"PARAMETER {key} {_quote(value)}")
    for message in description.messages:
        lines.append(f"MESSAGE {message['role']} {_quote(message['content'])}")
    if description.license:
        lines.append(f"LICENSE {_quote(description.license)}")
    return "\n".join(lines) + "\n"


def with_options(parameters: str, options: dict[str, Any]) -> str:
    """``parameters`` text with ``options`` in place of the lines of the same names."""
    kept = [line for line in parameters.splitlines() if line.partition(" ")[0] not in options]
    added = [(key, v) for key, value in options.items() for v in (value if isinstance(value, list) else [value])]
    return "\n".join([*kept, *(f"{key:<30} {_go_value(value)}" for key, value in added)])
