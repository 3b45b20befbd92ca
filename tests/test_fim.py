"""Fill-in-the-middle (Ollama's ``suffix``): the format a model's vocabulary names, the
``insert`` capability, and 400 for a model that cannot do it. Through real vLLM:
tests/e2e/test_generation.py."""

from __future__ import annotations

import json
from pathlib import Path

from common.fim import FORMATS, fim_format
from common.model_info import describe
from tests.fake_stack import MODEL, fake_stack
from workers.fake_engine import VOCAB_SIZE, FakeEngine

STARCODER = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


def tokens(text: str) -> list[int]:
    return [ord(c) % VOCAB_SIZE for c in text]


def test_each_format_is_found_by_its_markers_and_writes_its_own_prompt():
    qwen = fim_format(["a", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|endoftext|>"])
    assert qwen.prompt("def f(", "\n    return x") == "<|fim_prefix|>def f(<|fim_suffix|>\n    return x<|fim_middle|>"
    assert fim_format(STARCODER).prompt("a", "b") == "<fim_prefix>a<fim_suffix>b<fim_middle>"
    assert fim_format(["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"]).prompt("a", "b") == \
        "<｜fim▁begin｜>a<｜fim▁hole｜>b<｜fim▁end｜>"
    codestral = fim_format(["[PREFIX]", "[SUFFIX]", "[INST]"])
    assert codestral.prompt("a", "b") == "[SUFFIX]b[PREFIX]a"  # suffix first, as it was trained
    assert fim_format(["<fim_prefix>", "<fim_suffix>"]) is None  # one marker short
    assert fim_format(["<|im_start|>", "<|im_end|>"]) is None
    assert len({f.prefix for f in FORMATS}) == len(FORMATS)


def test_show_lists_insert_for_a_model_whose_vocabulary_has_the_markers(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "starcoder2", "architectures": ["X"]}))
    decoder = {str(i): {"content": t, "special": True} for i, t in enumerate(("<|endoftext|>", *STARCODER))}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    assert "insert" in describe(tmp_path).capabilities
    decoder.pop("1")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    assert "insert" not in describe(tmp_path).capabilities


async def test_suffix_writes_the_models_fim_prompt(redis_server):
    engine = FakeEngine(special_tokens=STARCODER, answer_tokens=2)
    async with fake_stack(redis_server.url, engine=engine) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "def f(", "suffix": "    return x\n",
                                                   "system": "ignored by the format", "stream": False})
        assert r.status_code == 200, r.text
        fim = tokens("<fim_prefix>def f(<fim_suffix>    return x\n<fim_middle>")
        assert r.json()["context"][:len(fim)] == fim and r.json()["prompt_eval_count"] == len(fim)

        # raw: the text as is, suffix or not (Ollama's raw mode)
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "def f(", "suffix": "x", "raw": True,
                                                   "stream": False})
        assert r.json()["prompt_eval_count"] == len("def f(")

        # OpenAI's completions take a suffix too
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "def f(", "suffix": "    return x\n"})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(fim)


async def test_a_model_without_the_markers_does_not_support_insert(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "def f(", "suffix": "x"})
        assert r.status_code == 400 and r.json()["error"] == f'"{MODEL.removesuffix(":latest")}" does not support insert'
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "def f(", "suffix": "x"})
        assert r.status_code == 400 and "does not support insert" in r.json()["error"]["message"]
        # An empty suffix asks for nothing to be filled in: a plain generation.
        r = await http.post("/api/generate", json={"model": MODEL, "prompt": "def f(", "suffix": "", "stream": False})
        assert r.status_code == 200
