"""/metrics with real vLLM: the engine's own scheduler figures reach it through the worker's
heartbeat while a request runs."""

from __future__ import annotations

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import MODEL
from tests.harness import wait_until

pytestmark = pytest.mark.e2e


def engine_figures(http) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            if s.labels.get("model") == MODEL and s.name.startswith("vllama_engine_"):
                found[s.name] = s.value
    return found


def test_engine_statistics_while_a_request_runs(http, stack):
    done = threading.Event()

    def long_answer() -> None:
        try:
            http.post("/api/generate", json={"model": MODEL, "prompt": "Tell a long story.", "stream": False,
                                             "options": {"num_predict": 400, "temperature": 0}}, timeout=300)
        finally:
            done.set()

    threading.Thread(target=long_answer, daemon=True).start()
    seen = {}

    def running() -> bool:
        seen.update(engine_figures(http))
        return done.is_set() or seen.get("vllama_engine_requests_running", 0) >= 1

    wait_until(running, 60, "the engine to report a running request", interval_s=0.2)
    assert seen["vllama_engine_requests_running"] >= 1 and 0 < seen["vllama_engine_kv_cache_usage_ratio"] <= 1
    done.wait(300)
