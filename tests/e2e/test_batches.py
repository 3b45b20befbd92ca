"""A small OpenAI batch through the real stack and real vLLM, with the official client."""

from __future__ import annotations

import io
import json

import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.harness import wait_until

pytestmark = pytest.mark.e2e


def test_small_batch_through_vllm(stack):
    client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)
    rows = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 8,
                      "temperature": 0}}
            for i, question in enumerate(["Say hello.", "Name a colour.", "Count to three."])]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    f = client.files.create(file=("small.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_until(lambda: client.batches.retrieve(batch.id).status in ("completed", "failed", "cancelled"), 120,
               "the batch to finish")
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3, done
    lines = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [x["custom_id"] for x in lines] == ["q0", "q1", "q2"]
    for line in lines:
        body = line["response"]["body"]
        assert body["choices"][0]["message"]["content"] and 0 < body["usage"]["completion_tokens"] <= 8
    # Greedy: the line's answer is what the same request answers interactively.
    direct = client.chat.completions.create(**rows[0]["body"])
    assert lines[0]["response"]["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content
