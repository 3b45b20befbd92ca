"""Fill-in-the-middle (``suffix``) through real vLLM, with a model whose vocabulary has
StarCoder's markers (tests/model_factory.py, make_fim_smollm2): the worker writes the FIM
prompt with them, and a model without them answers Ollama's 400."""

from __future__ import annotations

from pathlib import Path

import ollama
import pytest
from tokenizers import Tokenizer

from tests.e2e.conftest import MODEL as PLAIN_MODEL, pull_variant
from tests.model_factory import make_fim_smollm2

pytestmark = pytest.mark.e2e

REPO = "tiny-org/smollm2-fim"
BEFORE, AFTER = "def add(a, b):\n", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def fim_model(stack, tmp_path_factory) -> tuple[str, Path]:
    scratch = tmp_path_factory.mktemp("fim")
    return pull_variant(stack, REPO, make_fim_smollm2, scratch), scratch / "model"


def test_suffix_writes_the_fim_prompt_with_the_models_markers(http, stack, fim_model):
    model, model_dir = fim_model
    assert "insert" in http.post("/api/show", json={"model": model}).json()["capabilities"]
    assert "insert" not in http.post("/api/show", json={"model": PLAIN_MODEL}).json()["capabilities"]

    body = {"model": model, "prompt": BEFORE, "suffix": AFTER, "stream": False,
            "options": {"temperature": 0, "num_predict": 8}}
    r = http.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    expected = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(
        f"<fim_prefix>{BEFORE}<fim_suffix>{AFTER}<fim_middle>").ids
    assert r.json()["prompt_eval_count"] == len(expected)
    assert r.json()["context"][:len(expected)] == expected
    assert r.json()["eval_count"] > 0

    answer = ollama.Client(host=stack.base_url).generate(model=model, prompt=BEFORE, suffix=AFTER,
                                                         options={"temperature": 0, "num_predict": 8})
    assert answer.response == r.json()["response"]


def test_a_model_without_the_markers_answers_400(http):
    r = http.post("/api/generate", json={"model": PLAIN_MODEL, "prompt": BEFORE, "suffix": AFTER})
    assert r.status_code == 400 and r.json()["error"] == '"smollm2:135m" does not support insert'
