"""A model made on one host runs on another: the worker that loads it fetches its files from
the store that holds them, over the network, and checks them against the manifest.

The model (tests/model_factory.py: a small real model directory with its manifest, as
`vllama create` leaves one) exists only in w1's store; w1's generation worker is stopped, so
only w2 can serve it, and w2's store must first fetch it from w1's pull worker.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.multihost.figures import report

pytestmark = pytest.mark.multihost

MADE = "made:1b"


def _generate(cluster) -> httpx.Response:
    return httpx.post(cluster.base_url + "/api/generate", timeout=120, json={
        "model": MADE, "prompt": "hi", "stream": False, "options": {"num_predict": 3}})


def _model_files(home) -> dict[str, bytes]:
    root = home / "models" / "local"
    return {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_model_made_on_one_host_is_fetched_and_served_by_another(make_cluster):
    cluster = make_cluster(store_models={"w1": [MADE]}, worker_env={"VLLAMA_MAX_LOADED_MODELS": "2"})
    cluster.services["worker@w1"].terminate()
    assert not _model_files(cluster.home("w2")), "w2's store starts without the model"

    started = time.monotonic()
    r = _generate(cluster)
    assert r.status_code == 200, r.text
    assert r.json()["response"] == "tok0 tok1 tok2 "
    served_s = time.monotonic() - started

    fetched, made = _model_files(cluster.home("w2")), _model_files(cluster.home("w1"))
    assert fetched == made, "w2 holds the same files, byte for byte"
    ps = httpx.get(cluster.base_url + "/api/ps", timeout=10).json()["models"]
    [entry] = [m for m in ps if m["name"] == MADE]
    assert [w["host"] for w in entry["workers"]] == ["w2"]
    tags = httpx.get(cluster.base_url + "/api/tags", timeout=10).json()["models"]
    assert MADE in {m["name"] for m in tags}
    report("model_from_another_host", served_s=served_s, files=len(fetched),
           bytes=sum(len(b) for b in fetched.values()))


def test_a_file_changed_on_the_source_host_is_refused_and_nothing_is_kept(make_cluster):
    cluster = make_cluster(store_models={"w1": [MADE]}, worker_env={"VLLAMA_MAX_LOADED_MODELS": "2"})
    cluster.services["worker@w1"].terminate()
    [weights] = (cluster.home("w1") / "models" / "local").rglob("model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the same size, other bytes: only the digest can tell
    weights.write_bytes(bytes(data))

    r = _generate(cluster)
    assert r.status_code >= 400 and "does not match its manifest" in r.json()["error"], r.text
    assert not _model_files(cluster.home("w2")), "nothing half-fetched is kept"
    manifests = cluster.home("w2") / "models" / "manifests"
    assert not manifests.exists() or not any(manifests.iterdir())
