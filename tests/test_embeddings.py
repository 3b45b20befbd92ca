"""Embeddings through the whole stack with the fake engine: the wire formats of /api/embed,
/api/embeddings and /v1/embeddings, the vectors' packing through Redis, and the errors. The
vectors of a real model are checked in tests/e2e/test_embeddings.py."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from common.protocol import EmbeddingsFrame, EmbedInput
from common.vectors import runs_of, vectors_of
from tests.fake_stack import fake_stack
from workers.embedding import shaped
from workers.fake_engine import EMBED_DIM, FakeEngine, fake_vectors

MODEL = "fake-embed:test"


def _stack(redis_server, **kw):
    return fake_stack(redis_server.url, engine=FakeEngine(embedding=True), model=MODEL, **kw)


def _expected(texts: list[str], normalize: bool = True, dimensions: int | None = None) -> np.ndarray:
    """What the fake engine's vectors become, computed here from its own function."""
    raw = fake_vectors(FakeEngine(embedding=True).encode_inputs(texts, None))
    return shaped(raw, EmbedInput(texts=texts, normalize=normalize, dimensions=dimensions))


# ------------------------------------------------------------------------- packing


def test_frames_carry_every_vector_exactly_and_in_order():
    vectors = np.random.default_rng(1).standard_normal((3000, 384)).astype(np.float32)
    runs = list(runs_of(vectors))
    assert len(runs) > 1  # more than one frame's worth
    frames = [EmbeddingsFrame(seq=i, **run.model_dump()) for i, run in enumerate(reversed(runs))]  # any order
    assert np.array_equal(vectors_of(frames), vectors)


def test_shaped_cuts_to_dimensions_then_normalizes():
    raw = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    out = shaped(raw, EmbedInput(texts=["a", "b"], dimensions=2))
    assert np.allclose(out, [[0.6, 0.8], [0.0, 0.0]])  # a zero vector stays zero, not NaN
    assert np.allclose(shaped(raw, EmbedInput(texts=["a", "b"], normalize=False)), raw)


# ------------------------------------------------------------------------- Ollama


async def test_api_embed_answers_one_unit_vector_per_input_in_order(redis_server):
    texts = [f"input number {i}" for i in range(40)] + ["same", "same"]
    async with _stack(redis_server) as s, s.client() as c:
        r = await c.post("/api/embed", json={"model": MODEL, "input": texts})
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["model"] == MODEL
    got = np.array(body["embeddings"], dtype=np.float32)
    assert got.shape == (len(texts), EMBED_DIM)
    assert np.allclose(got, _expected(texts), atol=1e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert body["prompt_eval_count"] == sum(map(len, texts))  # the fake: a token per character
    assert body["total_duration"] > 0 and body["load_duration"] >= 0


async def test_api_embed_string_input_dimensions_and_empty(redis_server):
    async with _stack(redis_server) as s, s.client() as c:
        one = (await c.post("/api/embed", json={"model": MODEL, "input": "hello", "dimensions": 4})).json()
        assert np.allclose(one["embeddings"], _expected(["hello"], dimensions=4), atol=1e-6)
        for empty in ("", [], None):
            r = await c.post("/api/embed", json={"model": MODEL, "input": empty})
            assert r.status_code == 200 and r.json() == {"model": MODEL, "embeddings": []}, r.text


async def test_api_embeddings_is_one_vector_not_normalized(redis_server):
    async with _stack(redis_server) as s, s.client() as c:
        body = (await c.post("/api/embeddings", json={"model": MODEL, "prompt": "hello there"})).json()
        assert np.allclose(body["embedding"], _expected(["hello there"], normalize=False)[0])
        assert abs(np.linalg.norm(body["embedding"]) - 1) > 0.1
        assert (await c.post("/api/embeddings", json={"model": MODEL, "prompt": ""})).json() == {"embedding": []}


@pytest.mark.parametrize("body, status, part", [
    ({"input": [1, 2]}, 400, "invalid input type"),
    ({"input": {"a": 1}}, 400, "invalid input type"),
    ({"input": "x" * 5000, "truncate": False}, 400, "the input length exceeds the context length"),
    ({"input": "hello", "dimensions": EMBED_DIM + 1}, 400, f"ask for 1 to {EMBED_DIM}"),
    ({"input": "hello", "dimensions": 0}, 400, "dimensions is 0"),
    ({"input": ["x"] * 5000}, 413, "more than the 4096 allowed"),
])
async def test_api_embed_bad_input_says_what_to_do(redis_server, body, status, part):
    async with _stack(redis_server, max_model_len=1024) as s, s.client() as c:
        r = await c.post("/api/embed", json={"model": MODEL, **body})
        assert r.status_code == status and part in r.json()["error"], r.text
        # The worker is unharmed: the next request is answered.
        assert (await c.post("/api/embed", json={"model": MODEL, "input": "ok"})).status_code == 200


async def test_truncate_cuts_a_long_input_to_the_context(redis_server):
    long = "abcdefghij" * 300
    async with fake_stack(redis_server.url, engine=FakeEngine(embedding=True, max_model_len=100), model=MODEL) as s, \
            s.client() as c:
        body = (await c.post("/api/embed", json={"model": MODEL, "input": long})).json()
    assert body["prompt_eval_count"] == 100
    assert np.allclose(body["embeddings"], _expected([long[:100]]), atol=1e-6)


async def test_generation_and_embedding_models_refuse_each_others_work(redis_server):
    async with _stack(redis_server) as s, s.client() as c:
        r = await c.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False})
        assert r.status_code == 400 and r.json()["error"] == f'"{MODEL}" does not support generate'
        r = await c.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"] == f'"{MODEL}" does not support chat'
    async with fake_stack(redis_server.url) as s, s.client() as c:  # a generation model
        r = await c.post("/api/embed", json={"model": "fake:test", "input": "hi"})
        assert r.status_code == 400 and r.json()["error"] == '"fake:test" does not support embeddings'
        r = await c.post("/v1/embeddings", json={"model": "fake:test", "input": "hi"})
        assert r.status_code == 400 and "does not support embeddings" in r.json()["error"]["message"]


# ------------------------------------------------------------------------- OpenAI


async def test_v1_embeddings_every_input_shape_and_both_encodings(redis_server):
    texts = ["alpha", "beta", "gamma"]
    async with _stack(redis_server) as s, s.client() as c:
        r = await c.post("/v1/embeddings", json={"model": MODEL, "input": texts})
        body = r.json()
        assert r.status_code == 200 and body["object"] == "list" and body["model"] == MODEL, r.text
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        assert np.allclose([d["embedding"] for d in body["data"]], _expected(texts), atol=1e-6)
        assert body["usage"] == {"prompt_tokens": 14, "total_tokens": 14}

        b64 = (await c.post("/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "base64",
                                                     "dimensions": 8})).json()
        decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]]
        assert np.allclose(decoded, _expected(texts, dimensions=8), atol=1e-6)

        ids = [ord(ch) for ch in "alpha"]  # the fake's "tokens" are characters
        for shape in (ids, [ids, ids]):
            body = (await c.post("/v1/embeddings", json={"model": MODEL, "input": shape})).json()
            assert np.allclose(body["data"][0]["embedding"], _expected(["alpha"])[0], atol=1e-6)

        one = (await c.post("/v1/embeddings", json={"model": MODEL, "input": ""})).json()
        assert len(one["data"]) == 1


@pytest.mark.parametrize("body, part", [
    ({"input": []}, "invalid input"),
    ({"input": [[]]}, "invalid input"),
    ({"input": [1, "a"]}, "invalid input"),
    ({"input": [-1, 5]}, "not a token id"),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
])
async def test_v1_embeddings_bad_input_is_openais_400(redis_server, body, part):
    async with _stack(redis_server) as s, s.client() as c:
        r = await c.post("/v1/embeddings", json={"model": MODEL, **body})
        assert r.status_code == 400 and part in r.json()["error"]["message"], r.text


async def test_token_ids_outside_the_vocabulary_are_400(redis_server):
    async with _stack(redis_server) as s, s.client() as c:
        r = await c.post("/v1/embeddings", json={"model": MODEL, "input": [1, 10**9]})
        assert r.status_code == 400 and "not a token of" in r.json()["error"]["message"], r.text


# ------------------------------------------------------------------------- the bundled model


def test_the_bundled_embedding_model_is_imported_from_its_zip_once(tmp_path):
    from common.models import ALIASES
    from common.protocol import PullState
    from workers.pull import Progress, import_bundled
    from workers.store import ModelStore

    store = ModelStore(tmp_path / "models")
    progress = Progress(PullState(model="all-minilm:latest", store_id="local"))
    first = import_bundled(store, "all-minilm:latest", ALIASES["all-minilm:latest"], progress)
    assert first.description.capabilities == ["embedding"]
    assert first.description.context_length == 256 and first.description.embedding_length == 384
    assert {"config.json", "model.safetensors", "modules.json", "1_Pooling/config.json"} <= {f.path for f in first.files}
    again = import_bundled(store, "all-minilm:l6-v2", ALIASES["all-minilm:l6-v2"], progress)
    assert again.path == first.path  # one copy under both names
    assert len(list(store.local.iterdir())) == 1


def test_a_zip_member_that_climbs_out_is_refused(tmp_path):
    import zipfile

    from common.protocol import PullState
    from workers.pull import Progress, import_zip
    from workers.store import ModelStore

    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("../escaped.txt", "x")
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ValueError, match="unsafe member name"):
        import_zip(store, "bad:latest", archive, Progress(PullState(model="bad:latest", store_id="local")))
    assert not (tmp_path / "models" / "escaped.txt").exists() and not list(store.local.glob("*/escaped.txt"))
    assert store.get("bad:latest") is None


def test_an_embedding_model_takes_a_small_share_of_the_gpu(tmp_path):
    from common.settings import Settings
    from tests.model_factory import write_model
    from workers.main import EMBEDDING_GPU_SHARE, gpu_share
    from workers.store import ModelStore

    store = ModelStore(tmp_path / "models")
    chat = store.model_dir(write_model(tmp_path, "chat:1"))
    embedder = store.model_dir(write_model(tmp_path, "embedder:1", architecture="BertModel"))
    settings = Settings(gpu_memory_utilization=0.9, max_loaded_models=2)
    assert gpu_share(settings, chat) == pytest.approx(0.45)
    assert gpu_share(settings, embedder) == EMBEDDING_GPU_SHARE


# ------------------------------------------------------------------------- the Batch API


async def test_a_batch_of_embedding_lines(redis_server):
    import io
    import json

    import openai

    from tests.test_batches import finished

    rows = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": MODEL, "input": [f"text {i}", f"more {i}"],
                      **({"encoding_format": "base64"} if i % 2 else {})}} for i in range(6)]
    rows.append({"custom_id": "bad", "method": "POST", "url": "/v1/embeddings", "body": {"model": MODEL, "input": []}})
    async with _stack(redis_server) as s:
        client = openai.AsyncOpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0)
        f = await client.files.create(file=("in.jsonl", io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())),
                                      purpose="batch")
        batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
        done = (await finished(client, batch.id))[-1]
        assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 6, 1)
        output = [json.loads(line) for line in (await client.files.content(done.output_file_id)).text.splitlines()]
        errors = [json.loads(line) for line in (await client.files.content(done.error_file_id)).text.splitlines()]
    assert [line["custom_id"] for line in errors] == ["bad"]
    assert "invalid input" in errors[0]["response"]["body"]["error"]["message"]
    for line in output:
        i = int(line["custom_id"][1:])
        body = line["response"]["body"]
        assert body["object"] == "list" and body["model"] == MODEL and body["usage"]["prompt_tokens"] > 0
        vectors = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") if i % 2 else d["embedding"]
                   for d in body["data"]]
        assert np.allclose(vectors, _expected([f"text {i}", f"more {i}"]), atol=1e-6)
