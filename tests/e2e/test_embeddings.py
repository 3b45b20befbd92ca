"""Embeddings through the real stack and real vLLM, with the bundled all-minilm (sentence-
transformers' all-MiniLM-L6-v2): every vector is checked against the same model run here with
plain transformers (mean pooling over the tokens, then L2 normalization, as its
sentence-transformers config says), through our HTTP API and through the official clients."""

from __future__ import annotations

import base64
import zipfile

import httpx
import numpy as np
import ollama
import pytest
import torch
from langchain_ollama import OllamaEmbeddings
from langchain_openai import OpenAIEmbeddings
from openai import OpenAI

from common.models import ALIASES
from tests.e2e.conftest import MODEL as CHAT_MODEL
from workers.pull import bundled_path

pytestmark = pytest.mark.e2e

MODEL = "all-minilm"
MAX_TOKENS = 256  # its sentence_bert_config's max_seq_length: longer inputs are cut to it
TEXTS = ["The cat sits on the mat.", "A feline rests on a rug.", "Quarterly revenue grew by 4%.", "",
         "naïve café — 東京 🚀", "word " * 400]


class Reference:
    """all-MiniLM-L6-v2 in this process, with transformers only."""

    def __init__(self, model_dir) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).eval()

    def __call__(self, texts: list[str], normalize: bool = True) -> np.ndarray:
        out = []
        for start in range(0, len(texts), 64):
            batch = self.tokenizer(texts[start:start + 64], padding=True, truncation=True, max_length=MAX_TOKENS,
                                   return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=1)
            out.append(pooled.numpy())
        return np.concatenate(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    model_dir = tmp_path_factory.mktemp("all-minilm")
    with zipfile.ZipFile(bundled_path(ALIASES["all-minilm:latest"].bundled)) as zf:
        zf.extractall(model_dir)
    return Reference(model_dir)


@pytest.fixture(scope="module")
def loaded(stack):
    """The embedding model loaded beside the chat model; unloaded after, for the other tests."""
    with httpx.Client(base_url=stack.base_url, timeout=600) as c:
        r = c.post("/api/embed", json={"model": MODEL, "input": "load", "keep_alive": -1})
        assert r.status_code == 200, r.text
        yield
        c.post("/api/embed", json={"model": MODEL, "input": [], "keep_alive": 0})


def _cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_api_embed_matches_the_model_run_with_transformers(stack, http, loaded, reference):
    r = http.post("/api/embed", json={"model": MODEL, "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.array(body["embeddings"])
    assert got.shape == (len(TEXTS), 384)
    assert _cosines(got, reference(TEXTS)).min() >= 0.99
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)
    # The paraphrase is close, the unrelated sentence is not (the model works, not just runs).
    assert got[0] @ got[1] > 0.5 > got[0] @ got[2]
    expected_tokens = sum(min(len(reference.tokenizer(t)["input_ids"]), MAX_TOKENS) for t in TEXTS)
    assert body["prompt_eval_count"] == expected_tokens
    assert body["model"] == MODEL and body["total_duration"] > 0


def test_a_thousand_inputs_in_one_request(http, loaded, reference):
    texts = [f"Sentence {i}: {'cats and dogs' if i % 2 else 'stocks and bonds'} number {i * 7919 % 1000}."
             for i in range(1000)]
    body = http.post("/api/embed", json={"model": MODEL, "input": texts}, timeout=600).json()
    got = np.array(body["embeddings"])
    assert got.shape == (1000, 384)
    assert _cosines(got, reference(texts)).min() >= 0.99  # each in its place


def test_dimensions_truncate_and_the_older_endpoint(http, loaded, reference):
    short = http.post("/api/embed", json={"model": MODEL, "input": TEXTS[:2], "dimensions": 64}).json()
    full = reference(TEXTS[:2], normalize=False)[:, :64]
    assert _cosines(short["embeddings"], full).min() >= 0.99
    assert np.allclose(np.linalg.norm(short["embeddings"], axis=1), 1, atol=1e-4)

    r = http.post("/api/embed", json={"model": MODEL, "input": TEXTS[-1], "truncate": False})
    assert r.status_code == 400 and "the input length exceeds the context length" in r.json()["error"]

    legacy = http.post("/api/embeddings", json={"model": MODEL, "prompt": TEXTS[0]}).json()["embedding"]
    raw = reference(TEXTS[:1], normalize=False)[0]
    assert _cosines([legacy], [raw])[0] >= 0.99
    assert abs(np.linalg.norm(legacy) - np.linalg.norm(raw)) / np.linalg.norm(raw) < 0.01  # not normalized


def test_openai_embeddings_floats_base64_and_token_ids(stack, http, loaded, reference):
    expected = reference(TEXTS[:3])
    client = OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)
    result = client.embeddings.create(model=MODEL, input=TEXTS[:3])  # the client asks for base64
    assert [d.index for d in result.data] == [0, 1, 2]
    assert _cosines([d.embedding for d in result.data], expected).min() >= 0.99
    assert result.usage.prompt_tokens == result.usage.total_tokens > 0
    floats = client.embeddings.create(model=MODEL, input=TEXTS[:3], encoding_format="float")
    assert np.allclose([d.embedding for d in floats.data], [d.embedding for d in result.data], atol=1e-6)

    ids = reference.tokenizer(TEXTS[0])["input_ids"]
    by_ids = http.post("/v1/embeddings", json={"model": MODEL, "input": [ids]}).json()
    assert _cosines([by_ids["data"][0]["embedding"]], expected[:1])[0] >= 0.99
    b64 = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[0], "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert _cosines([vector], expected[:1])[0] >= 0.99


def test_ollama_client_embed_and_embeddings(stack, loaded, reference):
    client = ollama.Client(host=stack.base_url)
    r = client.embed(model=MODEL, input=TEXTS[:2])
    assert _cosines(r.embeddings, reference(TEXTS[:2])).min() >= 0.99
    assert r.prompt_eval_count > 0
    single = client.embeddings(model=MODEL, prompt=TEXTS[0])
    assert _cosines([single.embedding], reference(TEXTS[:1], normalize=False))[0] >= 0.99


def test_langchain_ollama_and_openai_embeddings(stack, loaded, reference):
    expected = reference(TEXTS[:3])
    for embedder in (
        OllamaEmbeddings(model=MODEL, base_url=stack.base_url),
        # An OpenAI-compatible server: send text, not OpenAI's own tokenizer's ids.
        OpenAIEmbeddings(model=MODEL, base_url=stack.base_url + "/v1", api_key="unused",
                         check_embedding_ctx_length=False, max_retries=0),
    ):
        documents = embedder.embed_documents(TEXTS[:3])
        assert _cosines(documents, expected).min() >= 0.99
        assert _cosines([embedder.embed_query(TEXTS[0])], expected[:1])[0] >= 0.99


def test_show_tags_ps_and_wrong_kind_of_request(http, loaded):
    show = http.post("/api/show", json={"model": MODEL}).json()
    assert show["capabilities"] == ["embedding"]
    assert show["details"]["family"] == "bert" and show["model_info"]["bert.embedding_length"] == 384
    pulled = http.post("/api/pull", json={"model": "all-minilm:22m", "stream": False})  # another of its names
    assert pulled.status_code == 200 and pulled.json()["status"] == "success", pulled.text
    names = {m["name"]: m for m in http.get("/api/tags").json()["models"]}
    assert {"all-minilm:latest", "all-minilm:22m"} <= set(names)
    assert names["all-minilm:22m"]["details"]["family"] == "bert"
    assert any(m["name"] == "all-minilm:latest" for m in http.get("/api/ps").json()["models"])

    r = http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False})
    assert r.status_code == 400 and r.json()["error"] == '"all-minilm" does not support generate'
    r = http.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"] == '"all-minilm" does not support chat'
    r = http.post("/api/embed", json={"model": CHAT_MODEL, "input": "hi"})
    assert r.status_code == 400 and r.json()["error"] == f'"{CHAT_MODEL}" does not support embeddings'
