"""Property-based fuzzing over every operation of the OpenAPI document, against the whole
stack with the fake engine: real Redis, real HTTP, the real worker and pull worker.

Requests are generated from /openapi.json (api/openapi_bodies.py): per operation, first the
edge cases schemathesis derives from the schemas, then random bodies that fit the documented
schemas (positive) and bodies that do not (negative); half of them name the served model and
ids that exist, so generation, reads and cancels run, not only "not found". Every answer must be below
500 and match what the document says of it (status, media type, body schema, NDJSON lines and
SSE events included). Failures are collected rather than raised, so a run never shrinks and
always sends the same requests: fixed seed (derandomized), no example database.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.openapi_bodies import EXAMPLES, OPERATIONS
from cli.embedded_redis import free_port
from tests.fake_stack import MODEL, fake_stack
from tests.hub_standin import isolate_hf_client
from tests.model_factory import write_model

pytestmark = pytest.mark.asyncio(loop_scope="session")

SPARE = "spare:1b"  # a model for /api/delete to delete
MIN_REQUESTS = 2_000
# Examples per operation and mode; an operation with nothing to vary (GET /api/tags) is sent
# once or a few times, whatever the number, since Hypothesis stops when it has tried all.
POSITIVE = {"body": 80, "other": 30}
NEGATIVE = {"body": 40, "other": 15}
BUDGET_S = 420  # the whole run; past it the remaining operations are skipped and the test fails
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@schemathesis.deserializer("application/x-ndjson")
def _ndjson(_ctx: schemathesis.DeserializationContext, response: schemathesis.Response) -> list[Any]:
    """A stream of JSON lines, read as the array the document describes."""
    return [json.loads(line) for line in response.content.decode().splitlines() if line.strip()]


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.sent.values())


def _describe(case: schemathesis.Case, response: schemathesis.Response) -> str:
    body = case.body if case.body is not NOT_SET else None
    return (f"{case.method} {case.formatted_path} body={json.dumps(body, default=repr)[:300]} "
            f"-> {response.status_code} {response.text[:300]!r}")


def _make_real(case: schemathesis.Case, known: dict[str, str]) -> None:
    for name in case.path_parameters or {}:
        if name in known:
            case.path_parameters[name] = known[name]
    body = case.body
    if not isinstance(body, dict) or case.operation.path in ("/v1/files", "/v1/batches"):
        return
    if case.operation.path == "/api/delete":
        body["model"] = SPARE  # once; then "not found"
    elif case.operation.path == "/api/copy":
        body["source"] = MODEL
    else:
        body["model"] = MODEL
    if "generate" in case.operation.path or case.operation.path == "/v1/completions":
        body.setdefault("prompt", "hi")
    elif case.operation.path == "/v1/responses" and not body.get("input"):
        body["input"] = "hi"
    elif ("chat" in case.operation.path or "messages" in case.operation.path) and not body.get("messages"):
        body["messages"] = [{"role": "user", "content": "hi"}]
    if case.operation.path == "/v1/messages":
        body.setdefault("max_tokens", 8)


def _fuzz(base_url: str, known: dict[str, str], tally: Tally) -> None:
    """Runs in a thread: schemathesis sends with requests, the stack answers on the test's loop."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    session = requests.Session()
    deadline = time.monotonic() + BUDGET_S

    def send(case: schemathesis.Case, pick: int) -> None:
        # Half the cases name things that exist (the model, a job, a file, a batch) and carry
        # a prompt, so generation, reading and cancelling run too, not only "not found".
        if pick < 2:
            _make_real(case, known)
        response = case.call(base_url=base_url, session=session, timeout=60)
        tally.sent[case.operation.label] += 1
        tally.statuses[response.status_code] += 1
        if response.status_code >= 500:
            tally.server_errors.append(_describe(case, response))
        try:
            case.validate_response(response, checks=CHECKS)
        except (Failure, FailureGroup) as exc:
            if response.status_code < 500:
                tally.mismatches.append(f"{_describe(case, response)}\n    {str(exc)[:1500]}")

    coverage = schema.config.generation_for(phase="coverage")
    for result in schema.get_all_operations():
        operation = result.ok()
        has_body = bool(operation.body)
        # First the edge cases schemathesis derives from each schema, one field at a time
        # (bounds, empty and missing values, wrong types, unexpected methods): deterministic.
        cases = operation.schema.iter_coverage_cases(
            operation, generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
            generation_config=coverage)
        for index, case in enumerate(cases):
            if time.monotonic() > deadline:
                tally.skipped.append(f"{operation.label} (coverage): out of time")
                break
            send(case, index % 4)
        # Then random bodies, valid and not, from a fixed seed.
        for mode, counts in ((GenerationMode.POSITIVE, POSITIVE), (GenerationMode.NEGATIVE, NEGATIVE)):
            if time.monotonic() > deadline:
                tally.skipped.append(f"{operation.label} ({mode.value}): out of time")
                continue
            strategy = operation.as_strategy(generation_mode=mode)

            @settings(max_examples=counts["body" if has_body else "other"], derandomize=True, database=None,
                      deadline=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy, pick=st.integers(0, 3))
            def run(case: schemathesis.Case, pick: int) -> None:
                if time.monotonic() < deadline:
                    send(case, pick)

            try:
                run()
            except Exception as exc:  # noqa: BLE001 - e.g. nothing negative to generate for this operation
                if "Unsatisfiable" in type(exc).__name__ or mode is GenerationMode.NEGATIVE:
                    tally.skipped.append(f"{operation.label} ({mode.value}): {type(exc).__name__}: {exc}"[:300])
                else:
                    raise
    session.close()


async def _known_objects(http: httpx.AsyncClient) -> dict[str, str]:
    """A job, a file, a batch and a stored response that exist, for the cases that use real ids."""
    job = await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": "hi"})
    assert job.status_code == 202, job.text
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}}
    upload = await http.post("/v1/files", data={"purpose": "batch"},
                             files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")})
    assert upload.status_code == 200, upload.text
    batch = await http.post("/v1/batches", json={"input_file_id": upload.json()["id"],
                                                  "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert batch.status_code == 200, batch.text
    response = await http.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2})
    assert response.status_code == 200, response.text
    return {"job_id": job.json()["id"], "file_id": upload.json()["id"], "batch_id": batch.json()["id"],
            "response_id": response.json()["id"], "model": MODEL}


async def test_every_operation_is_described():
    """A route added without its body in api/openapi_bodies.py would be fuzzed blind, and
    /docs would show it with none."""
    from api.app import create_app
    from common.settings import Settings

    doc = create_app(Settings(redis_url="redis://unused")).openapi()
    documented = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert documented == set(OPERATIONS), (documented ^ set(OPERATIONS))
    bodies = {(m, p) for (m, p), op in OPERATIONS.items() if op.body or op.multipart or op.raw}
    assert {(m, p) for (m, p) in documented if m in ("post", "put", "patch")} - bodies <= {
        ("post", "/v1/batches/{batch_id}/cancel")}
    assert ("delete", "/api/delete") in bodies
    schemathesis.openapi.from_dict(doc).validate()  # a valid OpenAPI 3.1 document
    for (method, path), op in OPERATIONS.items():  # /docs' "Try it out" starts from a valid body
        if op.body is not None and path in EXAMPLES:
            op.body.model_validate(EXAMPLES[path])


async def test_fuzz_every_operation(redis_server, tmp_path, monkeypatch):
    isolate_hf_client(monkeypatch, tmp_path / "hf_home")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # pulls fail at once, offline
    # On the store too, so the worker loads them again after a request unloads them.
    for name in (MODEL, SPARE):
        write_model(tmp_path / "home", name)
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path / "home", auto_pull="off") as stack:
        async with stack.client() as http:
            known = await _known_objects(http)
        tally = Tally()
        started = time.monotonic()
        await asyncio.to_thread(_fuzz, stack.base_url, known, tally)
        elapsed = time.monotonic() - started
        async with stack.client() as http:
            health = await http.get("/health")
            metrics = (await http.get("/metrics")).text.splitlines()
    # The server's own count: 5xx a client never saw (a cancelled stream) would show here.
    counted = [line for line in metrics if line.startswith("vllama_http_requests_total")]
    server_side_5xx = [line for line in counted if 'status="5' in line]
    print(f"\nfuzzing: {tally.total} requests over {len(tally.sent)} operations in {elapsed:.0f} s; "
          f"5xx: {len(tally.server_errors)}; schema mismatches: {len(tally.mismatches)}")
    print(f"the server counted {sum(int(float(line.rsplit(' ', 1)[1])) for line in counted)} requests")
    print("statuses:", dict(sorted(tally.statuses.items())))
    for label, count in sorted(tally.sent.items()):
        print(f"  {count:5d}  {label}")
    for note in tally.skipped:
        print("  skipped:", note)
    assert not tally.server_errors, "answers 500 or above:\n" + "\n".join(tally.server_errors[:20])
    assert not server_side_5xx, server_side_5xx
    assert not tally.mismatches, "answers not as documented:\n" + "\n".join(tally.mismatches[:10])
    assert tally.total >= MIN_REQUESTS, f"only {tally.total} requests sent in {elapsed:.0f} s"
    assert health.status_code == 200, health.text
