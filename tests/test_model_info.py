"""Describing a model directory: real (tiny) safetensors files, configs shaped like real ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from common.model_info import LICENSE_LIMIT, ModelDescription, describe, human_number, modelfile

VOCAB, HIDDEN, FFN, LAYERS, KV_DIM = 64, 16, 32, 2, 8


def _llama_config(**overrides) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": "float32", "eos_token_id": 2,
    }
    return {**config, **overrides}


def _layer(i: int, dtype=np.float32) -> dict[str, np.ndarray]:
    p = f"model.layers.{i}."
    shapes = {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (KV_DIM, HIDDEN),
        "self_attn.v_proj.weight": (KV_DIM, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (FFN, HIDDEN), "mlp.up_proj.weight": (FFN, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, FFN),
        "input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,),
    }
    return {p + name: np.zeros(shape, dtype=dtype) for name, shape in shapes.items()}


# What the shapes above add up to, written out so a counting bug cannot hide in shared code.
LAYER_PARAMS = 16 * 16 + 8 * 16 + 8 * 16 + 16 * 16 + 32 * 16 + 32 * 16 + 16 * 32 + 16 + 16  # 2336
EMBED_PARAMS = 64 * 16  # 1024
LLAMA_PARAMS = EMBED_PARAMS + LAYERS * LAYER_PARAMS + 16 + EMBED_PARAMS  # embed, layers, norm, lm_head


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def _llama_dir(root: Path, config: dict | None = None, lm_head: bool = True) -> Path:
    """A two-shard llama checkpoint with its index, as a pull leaves it."""
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / "config.json", config or _llama_config())
    first = {"model.embed_tokens.weight": np.zeros((VOCAB, HIDDEN), np.float32), **_layer(0)}
    second = {**_layer(1), "model.norm.weight": np.zeros((HIDDEN,), np.float32)}
    if lm_head:
        second["lm_head.weight"] = np.ones((VOCAB, HIDDEN), np.float32)
    shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    for name, tensors in shards.items():
        save_file(tensors, str(root / name), metadata={"format": "pt"})
    weight_map = {tensor: name for name, tensors in shards.items() for tensor in tensors}
    _write_json(root / "model.safetensors.index.json", {"metadata": {"total_size": 0}, "weight_map": weight_map})
    return root


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, "0"), (999, "999"), (1000, "1K"), (1001, "1K"), (1_000_000, "1M"), (125_000_000, "125M"),
     (500_500_000, "500.50M"), (500_550_000, "500.55M"), (1_000_000_000, "1B"), (2_800_000_000, "2.8B"),
     (2_850_000_000, "2.9B"), (1_000_000_000_000, "1000B"), (8_030_261_248, "8.0B"),
     (134_515_008, "134.52M")],
)
def test_human_number_matches_ollama(n, expected):
    assert human_number(n) == expected


def test_sharded_llama(tmp_path):
    model = _llama_dir(tmp_path / "m")
    d = describe(model)
    assert d.parameter_count == LLAMA_PARAMS == 6736
    assert d.details.model_dump() == {
        "parent_model": "", "format": "safetensors", "family": "llama", "families": ["llama"],
        "parameter_size": "7K", "quantization_level": "F32",
    }
    assert (d.context_length, d.embedding_length, d.architecture) == (4096, HIDDEN, "LlamaForCausalLM")
    assert d.model_info == {
        "general.architecture": "llama", "general.parameter_count": 6736, "general.file_type": 0,
        "llama.context_length": 4096, "llama.embedding_length": 16, "llama.block_count": 2,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.feed_forward_length": 32,
        "llama.rope.freq_base": 500000.0, "llama.vocab_size": 64,
    }
    assert d.size_bytes == sum(p.stat().st_size for p in model.iterdir())
    assert (d.template, d.license, d.capabilities) == ("", "", ["completion"])
    assert ModelDescription.model_validate_json(d.model_dump_json()) == d


def test_tied_embeddings_count_once(tmp_path):
    tied = _llama_config(tie_word_embeddings=True)
    stored_twice = describe(_llama_dir(tmp_path / "a", tied, lm_head=True))
    stored_once = describe(_llama_dir(tmp_path / "b", tied, lm_head=False))
    assert stored_twice.parameter_count == stored_once.parameter_count == LLAMA_PARAMS - EMBED_PARAMS


def test_bf16_weights_set_the_level(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    _write_json(tmp_path / "config.json", _llama_config(torch_dtype="bfloat16"))
    save_torch({"model.embed_tokens.weight": torch.zeros((VOCAB, HIDDEN), dtype=torch.bfloat16),
                "model.norm.weight": torch.zeros((HIDDEN,), dtype=torch.float32)},
               str(tmp_path / "model.safetensors"))
    d = describe(tmp_path)
    assert d.parameter_count == EMBED_PARAMS + HIDDEN
    assert d.details.quantization_level == "BF16"
    assert d.model_info["general.file_type"] == 32


@pytest.mark.parametrize(
    ("quantization_config", "level"),
    [({"quant_method": "awq", "bits": 4, "group_size": 16}, "AWQ-INT4"),
     ({"quant_method": "gptq", "bits": 4, "group_size": 16}, "GPTQ-INT4")],
)
def test_quantized_config_sets_level_and_unpacks_weights(tmp_path, quantization_config, level):
    _write_json(tmp_path / "config.json", _llama_config(quantization_config=quantization_config))
    save_file({
        "model.embed_tokens.weight": np.zeros((VOCAB, HIDDEN), np.float16),
        "model.layers.0.mlp.up_proj.qweight": np.zeros((HIDDEN, FFN // 8), np.int32),  # 8 values per int32
        "model.layers.0.mlp.up_proj.qzeros": np.zeros((1, FFN // 8), np.int32),
        "model.layers.0.mlp.up_proj.scales": np.zeros((1, FFN), np.float16),
    }, str(tmp_path / "model.safetensors"))
    d = describe(tmp_path)
    assert d.parameter_count == EMBED_PARAMS + HIDDEN * FFN
    assert d.details.quantization_level == level
    assert "general.file_type" not in d.model_info


def test_fp8_config(tmp_path):
    _write_json(tmp_path / "config.json", _llama_config(
        quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}))
    save_file({"w": np.zeros((4, 4), np.float32), "w_scale_inv": np.zeros((1,), np.float32)},
              str(tmp_path / "model.safetensors"))
    d = describe(tmp_path)
    assert (d.details.quantization_level, d.parameter_count) == ("FP8", 16)


def test_multimodal_config_reads_text_config(tmp_path):
    text = {k: v for k, v in _llama_config().items() if k not in ("architectures", "rope_theta")}
    text.update(max_position_embeddings=2048, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"})
    _write_json(tmp_path / "config.json", {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "text_config": text, "vision_config": {"model_type": "clip_vision_model", "hidden_size": 8},
    })
    save_file({"vision_tower.patch_embedding.weight": np.zeros((8, 3, 2, 2), np.float32),
               "language_model.model.embed_tokens.weight": np.zeros((VOCAB, HIDDEN), np.float32)},
              str(tmp_path / "model.safetensors"))
    d = describe(tmp_path)
    assert d.parameter_count == 8 * 3 * 2 * 2 + EMBED_PARAMS
    assert (d.details.family, d.context_length, d.embedding_length) == ("llava", 2048, HIDDEN)
    assert d.model_info["llava.context_length"] == 2048
    assert d.model_info["llava.rope.freq_base"] == 1000000.0
    assert d.capabilities == ["completion", "vision"]
    assert d.projector_info == {"clip.has_vision_encoder": True, "clip.vision.embedding_length": 8}
    assert describe(_bare_model(tmp_path / "text")).projector_info == {}


def _bare_model(root: Path, **config) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / "config.json", _llama_config(**config))
    save_file({"w": np.zeros((2, 3), np.float32)}, str(root / "model.safetensors"))
    return root


def test_template_list_takes_default_and_tools_from_any_named_template(tmp_path):
    model = _bare_model(tmp_path)
    _write_json(model / "tokenizer_config.json", {"chat_template": [
        {"name": "default", "template": "{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>"},
    ]})
    d = describe(model)
    assert d.template == "{{ messages[0]['content'] }}"
    assert d.capabilities == ["completion", "tools"] and d.tool_parser == "hermes"


def test_tools_need_a_call_format_that_can_be_read_back(tmp_path):
    """A template may render tools and teach a call format no parser here reads: the model
    cannot take tools then (its calls would come back as plain text)."""
    model = _bare_model(tmp_path)
    _write_json(model / "tokenizer_config.json", {"chat_template": "{% for tool in tools %}{{ tool }}{% endfor %}"})
    d = describe(model)
    assert d.capabilities == ["completion"] and d.tool_parser is None


def test_chat_template_jinja_wins_and_thinking_is_detected(tmp_path):
    model = _bare_model(tmp_path)
    _write_json(model / "tokenizer_config.json", {"chat_template": "from tokenizer_config"})
    jinja = "{% if tools %}{{ tools | tojson }}Environment: ipython{% endif %}{% if enable_thinking %}<think>{% endif %}"
    (model / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    d = describe(model)
    assert d.template == jinja
    assert d.capabilities == ["completion", "tools", "thinking"] and d.tool_parser == "llama3_json"


def test_tools_in_plain_text_is_not_a_tools_template(tmp_path):
    model = _bare_model(tmp_path)
    _write_json(model / "tokenizer_config.json", {"chat_template": "We have no tools. {{ messages }}"})
    assert describe(model).capabilities == ["completion"]


def test_parameters_from_generation_config_and_eos_ids(tmp_path):
    model = _bare_model(tmp_path)
    _write_json(model / "generation_config.json", {
        "eos_token_id": [2, 3, 99], "temperature": 0.6, "top_k": 20, "top_p": 0.95,
        "repetition_penalty": 1.0, "do_sample": True,
    })
    _write_json(model / "tokenizer_config.json", {
        "eos_token": "<|im_end|>",
        "added_tokens_decoder": {"2": {"content": "<|im_end|>", "special": True},
                                 "3": {"content": "<|endoftext|>", "special": True}},
    })
    assert describe(model).parameters == "\n".join([
        "temperature                    0.6",
        "top_k                          20",
        "top_p                          0.95",
        "repeat_penalty                 1",
        'stop                           "<|im_end|>"',
        'stop                           "<|endoftext|>"',
    ])


def test_eos_ids_resolve_through_tokenizer_json(tmp_path):
    model = _bare_model(tmp_path, eos_token_id=7)
    _write_json(model / "tokenizer_config.json", {"eos_token": {"content": "</s>"}})
    _write_json(model / "tokenizer.json", {"added_tokens": [{"id": 7, "content": "<|eot|>"}]})
    assert describe(model).parameters == "\n".join(
        ['stop                           "<|eot|>"', 'stop                           "</s>"'])


def test_snapshot_of_symlinks_to_blobs(tmp_path):
    """A Hugging Face cache snapshot: every file is a link into ``blobs/``."""
    source = _llama_dir(tmp_path / "source")
    (tmp_path / "blobs").mkdir()
    snapshot = tmp_path / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(source.iterdir())):
        blob = tmp_path / "blobs" / f"{i:040x}"
        path.rename(blob)
        (snapshot / path.name).symlink_to(Path("../..") / "blobs" / blob.name)
    d = describe(snapshot)
    assert d.parameter_count == LLAMA_PARAMS
    assert d.size_bytes == sum(p.stat().st_size for p in (tmp_path / "blobs").iterdir())


def test_license_is_read_and_truncated(tmp_path):
    model = _bare_model(tmp_path)
    (model / "LICENSE.txt").write_text("x" * (LICENSE_LIMIT + 10), encoding="utf-8")
    assert describe(model).license == "x" * LICENSE_LIMIT


def test_pytorch_bin_is_estimated_from_size(tmp_path):
    _write_json(tmp_path / "config.json", _llama_config(torch_dtype="float16"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 400)
    d = describe(tmp_path)
    assert (d.details.format, d.parameter_count, d.details.quantization_level) == ("pytorch", 200, "F16")


def test_modelfile(tmp_path):
    model = _bare_model(tmp_path)
    (model / "chat_template.jinja").write_text('{{ "<|im_start|>" }}\n{{ messages }}', encoding="utf-8")
    _write_json(model / "generation_config.json", {"temperature": 0.7})
    _write_json(model / "tokenizer_config.json", {"eos_token": "<|im_end|>"})
    (model / "LICENSE").write_text("MIT", encoding="utf-8")
    assert modelfile("smollm2:135m", describe(model)) == (
        '# Modelfile generated by "ollama show"\n'
        "# To build a new Modelfile based on this, replace FROM with:\n"
        "# FROM smollm2:135m\n\n"
        "FROM smollm2:135m\n"
        'TEMPLATE """{{ "<|im_start|>" }}\n{{ messages }}"""\n'
        "PARAMETER temperature 0.7\n"
        "PARAMETER stop <|im_end|>\n"
        "LICENSE MIT\n"
    )


def test_missing_directory_or_config(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        describe(tmp_path / "absent")
    with pytest.raises(ValueError, match=r"config\.json: not found"):
        describe(tmp_path)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [("config.json", "{not json", r"config\.json: not valid JSON"),
     ("config.json", "[1, 2]", r"config\.json: not a JSON object"),
     ("generation_config.json", "{", r"generation_config\.json: not valid JSON"),
     ("model.safetensors.index.json", '{"weight_map": {"w": "gone.safetensors"}}', "missing"),
     ("model.safetensors", "version https://git-lfs.github.com/spec/v1\n",
      r"model\.safetensors: not a safetensors")],
)
def test_broken_files_are_named(tmp_path, name, text, message):
    model = _bare_model(tmp_path)
    (model / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        describe(model)


def test_embedding_models_are_told_apart_from_generative_ones(tmp_path):
    """A causal LM with a sentence-transformers pooling step embeds (Qwen3-Embedding is one);
    so does an encoder-only architecture; a plain causal LM completes."""
    plain = describe(_llama_dir(tmp_path / "plain"))
    assert "completion" in plain.capabilities and "embedding" not in plain.capabilities

    pooled = _llama_dir(tmp_path / "pooled")
    _write_json(pooled / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                                          {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    _write_json(pooled / "sentence_bert_config.json", {"max_seq_length": 512})
    described = describe(pooled)
    assert described.capabilities == ["embedding"] and described.context_length == 512

    bert = _llama_dir(tmp_path / "bert", _llama_config(architectures=["BertModel"], model_type="bert"))
    assert describe(bert).capabilities == ["embedding"]
    assert describe(bert).context_length == 4096  # no sentence-transformers config: the model's own
