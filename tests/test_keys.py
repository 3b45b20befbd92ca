"""Several API keys (VLLAMA_API_KEYS): each key's jobs, files and batches are its own, an
admin key sees all, usage per key in /metrics, and /health says only ok/not ok without a key.
Over real Redis and HTTP with the fake engine standing in for vLLM."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from pydantic import ValidationError

from cli.main import main as vllama
from common import clock, keys
from common.api_keys import KeyFileError, hash_key, load_keys, parse_key_file
from common.records import JobRecord
from common.settings import Settings
from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until
from tests.test_metrics import samples
from workers.fake_engine import FakeEngine

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"alice": "alice-secret", "bob": "bob-secret", "ops": "ops-secret"}
SINGLE = "single-admin-secret"  # VLLAMA_API_KEY: an admin key named "admin"


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text("# name, SHA-256 of the key, admin\n"
                    f"alice {hash_key(KEYS['alice'])}\n"
                    f"bob   {hash_key(KEYS['bob'])}   # a comment after a key\n\n"
                    f"ops {hash_key(KEYS['ops'])} admin\n")
    return path


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SINGLE if name == 'admin' else KEYS[name]}"}


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def chat_line(i: int) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"q {i}"}], "max_tokens": 3}}


# ------------------------------------------------------------------ the keys file


def test_a_bad_keys_file_stops_the_server_at_start_naming_the_line(tmp_path):
    bad = tmp_path / "keys"
    bad.write_text(f"# keys\nalice {hash_key('a')}\nbob bob-secret-itself\n")
    with pytest.raises(ValidationError, match="line 3"):
        Settings(api_keys=bad)
    env = {**os.environ, "VLLAMA_API_KEYS": str(bad), "VLLAMA_REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-m", "cli", "api"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "VLLAMA_API_KEYS" in done.stderr and f"{bad} line 3" in done.stderr and "SHA-256" in done.stderr
    assert "Traceback" not in done.stderr

    for text, why in [(f"alice {hash_key('a')} root\n", "may only be `admin`"),
                      (f"alice {hash_key('a')}\nalice {hash_key('b')}\n", "already used on line 1"),
                      (f"alice {hash_key('a')}\nbob {hash_key('a')}\n", "already listed"),
                      (f"al ice {hash_key('a')} admin\n", "found 4 words"),
                      (f"-x {hash_key('a')}\n", "is not 1-64 letters")]:
        with pytest.raises(KeyFileError, match=why):
            parse_key_file(text)
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(KeyFileError, match="has no keys"):
        load_keys(tmp_path / "empty")
    with pytest.raises(KeyFileError, match="cannot read"):
        load_keys(tmp_path / "missing")
    with pytest.raises(KeyFileError, match="named 'admin'"):
        (tmp_path / "admin").write_text(f"admin {hash_key('a')}\n")
        load_keys(tmp_path / "admin", single_key="other")
    found = load_keys(keys_file(tmp_path), single_key=SINGLE)
    assert {(p.name, p.admin) for p in found.values()} == {("alice", False), ("bob", False), ("ops", True),
                                                           ("admin", True)}
    assert not any(key in keys_file(tmp_path).read_text() for key in KEYS.values())


def test_key_new_prints_a_key_and_its_line(capsys, tmp_path):
    vllama(["key", "new", "carol", "--admin"])
    out = capsys.readouterr().out.splitlines()
    key = out[0].removeprefix("key: ")
    line = out[-1]
    assert line.startswith("carol ") and line.endswith(" admin") and key not in line
    found = parse_key_file(line)
    assert found[hash_key(key)].name == "carol" and found[hash_key(key)].admin
    vllama(["key", "new", "dave"])
    assert capsys.readouterr().out.splitlines()[-1].count(" ") == 1  # no admin flag


# ------------------------------------------------------------------ the stack with keys


async def test_each_key_sees_only_its_own_jobs_files_and_batches(redis_server, tmp_path):
    async with fake_stack(redis_server.url, engine=FakeEngine(step_s=0.05, answer_tokens=200),
                          api_keys=keys_file(tmp_path), api_key=SINGLE) as stack, stack.client() as http:
        # Unknown or missing keys: 401; / and /health stay open.
        assert (await http.get("/api/tags")).status_code == 401
        r = await http.get("/api/tags", headers={"Authorization": "Bearer not-a-key"})
        assert r.status_code == 401 and "VLLAMA_API_KEYS" in r.json()["error"] and r.headers["www-authenticate"]
        assert (await http.get("/api/tags", headers=auth("alice"))).status_code == 200
        assert (await http.get("/")).status_code == 200

        # Jobs.
        body = {"model": MODEL, "prompt": "hi", "options": {"num_predict": 200}}
        job = (await http.post("/api/jobs/generate", json=body, headers=auth("alice"))).json()["id"]
        other = (await http.post("/api/jobs/generate", json=body, headers=auth("alice"))).json()["id"]
        bobs = (await http.post("/api/jobs/generate", json={**body, "options": {"num_predict": 2}},
                                headers=auth("bob"))).json()["id"]
        for method, path in [("GET", f"/api/jobs/{job}"), ("GET", f"/api/jobs/{job}/stream"),
                             ("DELETE", f"/api/jobs/{job}")]:
            r = await http.request(method, path, headers=auth("bob"))
            assert r.status_code == 404 and r.json() == {
                "error": f"job '{job}' not found (finished jobs are kept for 3600 s, VLLAMA_KEEP_RESULT_S)"}
        assert (await http.get(f"/api/jobs/{job}", headers=auth("alice"))).json()["status"] in ("queued", "running")
        assert [j["id"] for j in (await http.get("/api/jobs", headers=auth("bob"))).json()["jobs"]] == [bobs]
        assert {j["id"] for j in (await http.get("/api/jobs", headers=auth("alice"))).json()["jobs"]} == {job, other}
        for admin in ("ops", "admin"):
            listed = {j["id"] for j in (await http.get("/api/jobs", headers=auth(admin))).json()["jobs"]}
            assert listed == {job, other, bobs}
            assert (await http.get(f"/api/jobs/{job}", headers=auth(admin))).status_code == 200
        assert (await http.delete(f"/api/jobs/{job}", headers=auth("alice"))).status_code == 200
        assert (await http.delete(f"/api/jobs/{other}", headers=auth("ops"))).status_code == 200
        for cancelled in (job, other):  # a running job is cancelled by its worker, a moment later

            async def ended(job_id: str = cancelled) -> bool:
                return (await http.get(f"/api/jobs/{job_id}", headers=auth("alice"))).json()["status"] == "cancelled"
            await async_wait_until(ended, 10, f"job {cancelled} to be cancelled")

        # Files.
        client = {name: openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key=SINGLE if name == "admin"
                                           else KEYS[name], max_retries=0) for name in ("alice", "bob", "admin")}
        data = jsonl([chat_line(0), chat_line(1)])
        f = await client["alice"].files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        for call in (lambda c: c.files.retrieve(f.id), lambda c: c.files.content(f.id),
                     lambda c: c.files.delete(f.id)):
            with pytest.raises(openai.NotFoundError, match=f"No such File object: {f.id}"):
                await call(client["bob"])
        assert [x.id for x in (await client["bob"].files.list()).data] == []
        mine = (await http.get("/v1/files", headers=auth("alice"))).json()["data"]
        assert [x["id"] for x in mine] == [f.id] and "owner" not in mine[0]
        assert "owner" not in (await http.get(f"/v1/files/{f.id}", headers=auth("alice"))).json()
        assert (await client["admin"].files.content(f.id)).content == data

        # Batches: only with one's own file; then only one's own batch.
        with pytest.raises(openai.NotFoundError, match=f.id):
            await client["bob"].batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                               completion_window="24h")
        batch = await client["alice"].batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                     completion_window="24h")
        for call in (lambda c: c.batches.retrieve(batch.id), lambda c: c.batches.cancel(batch.id)):
            with pytest.raises(openai.NotFoundError, match=batch.id):
                await call(client["bob"])
        assert (await client["bob"].batches.list()).data == []
        assert [b.id for b in (await client["alice"].batches.list()).data] == [batch.id]
        assert [b.id for b in (await client["admin"].batches.list()).data] == [batch.id]

        async def completed() -> bool:
            return (await client["alice"].batches.retrieve(batch.id)).status == "completed"
        await async_wait_until(completed, 30, "the batch to complete")
        done = await client["alice"].batches.retrieve(batch.id)
        assert done.request_counts.completed == 2
        with pytest.raises(openai.NotFoundError):  # its output file is alice's too
            await client["bob"].files.content(done.output_file_id)
        assert len((await client["alice"].files.content(done.output_file_id)).text.splitlines()) == 2
        assert (await client["alice"].files.delete(f.id)).deleted

        # Records from before owners were kept: admin-only.
        now = clock.now()
        legacy = JobRecord(job_id="legacy-job", model=MODEL, kind="generate", is_async=True, status="done",
                           created_at=now).model_dump_json(by_alias=True, exclude={"owner"})
        await stack.redis.set(keys.job_record("legacy-job"), legacy, ex=60)
        await stack.redis.zadd(keys.JOBS, {"legacy-job": int(now * 1000)})
        assert (await http.get("/api/jobs/legacy-job", headers=auth("alice"))).status_code == 404
        assert "legacy-job" not in {j["id"] for j in (await http.get("/api/jobs", headers=auth("bob"))).json()["jobs"]}
        assert (await http.get("/api/jobs/legacy-job", headers=auth("ops"))).status_code == 200


async def test_usage_per_key_in_metrics(redis_server, tmp_path):
    async with fake_stack(redis_server.url, api_keys=keys_file(tmp_path)) as stack, stack.client() as http:
        generated = prompt = 0
        for _ in range(2):
            r = (await http.post("/api/generate", headers=auth("alice"),
                                 json={"model": MODEL, "prompt": "hi", "stream": False,
                                       "options": {"num_predict": 5}})).json()
            generated, prompt = generated + r["eval_count"], prompt + r["prompt_eval_count"]
        r = await http.post("/v1/chat/completions", headers=auth("alice"),
                            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                  "n": 2})
        usage = r.json()["usage"]
        # Each of the n choices is a job that reads the prompt: counted per job, as the engine works.
        generated, prompt = generated + usage["completion_tokens"], prompt + 2 * usage["prompt_tokens"]
        job = (await http.post("/api/jobs/chat", headers=auth("bob"),
                               json={"model": MODEL, "messages": [{"role": "user", "content": "y"}],
                                     "options": {"num_predict": 4}})).json()["id"]

        async def bob_done() -> bool:
            return (await http.get(f"/api/jobs/{job}", headers=auth("bob"))).json()["status"] == "done"
        await async_wait_until(bob_done, 10, "bob's async job")
        bob_prompt = (await http.get(f"/api/jobs/{job}", headers=auth("bob"))).json()["result"]["prompt_eval_count"]

        def value(found: dict, name: str, key: str) -> float | None:
            return found.get((name, frozenset({"key": key}.items())))

        async def counted() -> bool:  # workers add a job's tokens as they record its end
            found = samples((await http.get("/metrics", headers=auth("ops"))).text)
            return value(found, "vllama_key_generated_tokens_total", "alice") == generated and \
                value(found, "vllama_key_generated_tokens_total", "bob") == 4
        await async_wait_until(counted, 10, "tokens counted per key")
        found = samples((await http.get("/metrics", headers=auth("ops"))).text)
        assert value(found, "vllama_key_prompt_tokens_total", "alice") == prompt > 0
        assert value(found, "vllama_key_prompt_tokens_total", "bob") == bob_prompt > 0
        assert value(found, "vllama_key_requests_total", "alice") == 3
        assert value(found, "vllama_key_requests_total", "ops") >= 2
        # A key that is not admin sees its own usage only.
        bob_view = samples((await http.get("/metrics", headers=auth("bob"))).text)
        assert {dict(labels)["key"] for (name, labels) in bob_view if name.startswith("vllama_key_")} == {"bob"}
        # Only key names label the series: never a job, a model or an unknown key.
        await http.get("/api/tags", headers={"Authorization": "Bearer guessing"})
        keyed = {labels for (name, labels) in samples((await http.get("/metrics", headers=auth("ops"))).text)
                 if name.startswith("vllama_key_")}
        assert {dict(labels)["key"] for labels in keyed} == {"alice", "bob", "ops"}


async def test_health_without_a_key_says_only_ok_or_not(redis_server, tmp_path):
    async with fake_stack(redis_server.url, api_keys=keys_file(tmp_path)) as stack, stack.client() as http:
        r = await http.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        r = await http.get("/health", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        full = (await http.get("/health", headers=auth("bob"))).json()
        assert full["status"] == "ok" and full["redis"] == "ok"
        assert [w["worker_id"] for w in full["workers"]] == [stack.worker.worker_id]
        stack.worker.stop()  # no worker ready: 503, and still no detail without a key

        async def down() -> bool:
            return (await http.get("/health")).status_code == 503
        await async_wait_until(down, 15, "health to say unavailable")
        assert (await http.get("/health")).json() == {"status": "unavailable"}
        assert "reason" in (await http.get("/health", headers=auth("alice"))).json()


async def test_without_keys_everything_is_as_before(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        health = (await http.get("/health")).json()
        assert health["status"] == "ok" and health["workers"]
        job = (await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": "hi",
                                                           "options": {"num_predict": 2}})).json()["id"]
        assert [j["id"] for j in (await http.get("/api/jobs")).json()["jobs"]] == [job]
        assert "vllama_key_" not in (await http.get("/metrics")).text
