"""Context token ids outside the real model's vocabulary are a 400 from the worker, before
vLLM sees them; the worker serves on. (The API cannot know the vocabulary: it refuses only
ids that are no token id at all; tests/test_bad_input.py covers the rest with the fake engine.)"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import MODEL
from tests.harness import ndjson_lines

pytestmark = pytest.mark.e2e


def test_context_ids_outside_the_vocabulary_are_400_and_the_worker_serves_on(http):
    base = {"model": MODEL, "prompt": "Hello", "options": {"temperature": 0, "num_predict": 4}}
    good = http.post("/api/generate", json={**base, "stream": False})
    assert good.status_code == 200
    context = good.json()["context"]
    info = http.post("/api/show", json={"model": MODEL}).json()["model_info"]
    [vocab] = [v for k, v in info.items() if k.endswith(".vocab_size")]  # 49152 for the bundled model

    for bad in ([vocab], [vocab + 10**6], [2**31 - 1]):
        for stream in (False, True):
            r = http.post("/api/generate", json={**base, "stream": stream, "context": context + bad})
            assert r.status_code == 400, r.text
            message = r.json()["error"]
            assert f"context[{len(context)}]" in message and "vocabulary" in message, message
    for bad in ([-1], [2**40]):  # not token ids at all: refused by the API itself
        r = http.post("/api/generate", json={**base, "stream": False, "context": bad})
        assert r.status_code == 400 and "context[0]" in r.json()["error"]

    # The last id of the vocabulary is fine, and the worker still answers, streaming too.
    r = http.post("/api/generate", json={**base, "stream": False, "context": context + [vocab - 1]})
    assert r.status_code == 200 and r.json()["done"] is True
    r = http.post("/api/generate", json={**base, "context": context})
    assert r.status_code == 200 and ndjson_lines(r.text)[-1]["done"] is True
