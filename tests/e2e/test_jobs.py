"""An async job through the real stack and real vLLM (batch class: the worker's batch
queue, scheduled by vLLM at a lower priority)."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import MODEL
from tests.harness import wait_until

pytestmark = pytest.mark.e2e


def test_async_chat_job_polled_and_streamed(http):
    r = http.post("/api/jobs/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                                         "options": {"num_predict": 12, "temperature": 0}})
    assert r.status_code == 202 and r.json()["priority"] == "batch"
    job_id = r.json()["id"]
    found = {}

    def done() -> bool:
        found.update(http.get(f"/api/jobs/{job_id}").json())
        return found["status"] in ("done", "failed", "cancelled")

    wait_until(done, 120, "the async job to finish")
    assert found["status"] == "done", found
    result = found["result"]
    assert result["message"]["content"] == found["output"] and found["output"].strip()
    assert 0 < result["eval_count"] <= 12

    lines = [json.loads(line) for line in http.get(f"/api/jobs/{job_id}/stream").text.splitlines()]
    assert "".join(line["message"]["content"] for line in lines) == found["output"] and lines[-1]["done"]
    sync = http.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                                        "stream": False, "options": {"num_predict": 12, "temperature": 0}}).json()
    assert sync["message"]["content"] == found["output"]  # greedy: the same answer, interactive or batch
