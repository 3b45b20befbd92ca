"""Browser safety over real HTTP (fake engine, real Redis, real pull worker): Origin checks
with Ollama's defaults and OLLAMA_ORIGINS / VLLAMA_ORIGINS, CORS headers and preflights
(before authentication), and the Host check against DNS rebinding when bound to loopback.
tests/test_browser.py does the same through a real browser."""

from __future__ import annotations

import json

import pytest

from api.app import create_app
from api.origins import DEFAULT_ORIGINS, host_allowed, is_loopback_bind, parse_origins
from common.settings import Settings
from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until
from tests.hub_standin import HubStandin, isolate_hf_client
from tests.model_factory import write_model
from workers.fake_engine import FakeEngine

OTHER = "other:1b"
EVIL = "http://evil.example"
APP = "http://localhost:5173"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty Hub stand-in: a pull that gets anywhere asks it for the repository."""
    isolate_hf_client(monkeypatch, tmp_path / "hf_home")
    with HubStandin() as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        yield standin


@pytest.fixture(autouse=True)
def _no_env_origins(monkeypatch):
    monkeypatch.delenv("OLLAMA_ORIGINS", raising=False)
    monkeypatch.delenv("OLLAMA_HOST", raising=False)


async def tags(http) -> set[str]:
    return {m["name"] for m in (await http.get("/api/tags")).json()["models"]}


async def job_keys(stack) -> set[bytes]:
    return {k for k in await stack.redis.keys("*") if b"job" in k or k.startswith(b"arq:")}


# --- the rules themselves ---

def test_default_origins_are_ollamas():
    rules = parse_origins(DEFAULT_ORIGINS)
    for ok in ("http://localhost", "https://localhost", "http://localhost:5173", "https://127.0.0.1:8443",
               "http://0.0.0.0:3000", "http://[::1]:8080", "app://obsidian.md", "file://", "tauri://localhost",
               "vscode-webview://1234abcd", "vscode-file://vscode-app"):
        assert rules.allows(ok), ok
    for bad in ("http://evil.example", "http://localhost.evil.example", "http://127.0.0.1.evil.example",
                "null", "chrome-extension://abc", "https://example.com:443", "http://192.168.1.5:3000"):
        assert not rules.allows(bad), bad


def test_origin_entries_that_could_never_match_fail_at_start():
    with pytest.raises(ValueError, match="VLLAMA_ORIGINS/OLLAMA_ORIGINS.*https://example.com"):
        parse_origins(["example.com"])
    with pytest.raises(ValueError, match="more than one"):
        parse_origins(["https://*.example.*"])
    with pytest.raises(ValueError, match="VLLAMA_ORIGINS"):
        create_app(Settings(redis_url="redis://unused", origins="app.example.com"))
    rules = parse_origins([" HTTPS://App.Example.com/ ", "https://*.corp.example", "chrome-extension://*"])
    assert rules.allows("https://app.example.com") and rules.allows("https://a.b.corp.example")
    assert rules.allows("chrome-extension://abcdef") and not rules.allows("https://corp.example")
    assert parse_origins(["*"]).allows("https://anything.example")


def test_host_rules_follow_ollama():
    assert is_loopback_bind("127.0.0.1") and is_loopback_bind("127.1.2.3") and is_loopback_bind("::1")
    assert is_loopback_bind("localhost") and is_loopback_bind("[::1]")
    assert not is_loopback_bind("0.0.0.0") and not is_loopback_bind("::") and not is_loopback_bind("10.0.0.5")
    for ok in ("", "localhost", "localhost:11434", "LOCALHOST:11434", "127.0.0.1:11434", "[::1]:11434", "[::1]",
               "0.0.0.0", "192.168.1.10:11434", "10.1.2.3", "172.16.0.1", "myapp.localhost:3000", "printer.local",
               "db.internal:11434"):
        assert host_allowed(ok), ok
    for bad in ("evil.example", "evil.example:11434", "rebind.test:11434", "localhost.evil.example",
                "8.8.8.8:11434", "internal.evil.example", "local"):
        assert not host_allowed(bad), bad


# --- over HTTP ---

async def test_a_disallowed_origin_changes_nothing(redis_server, tmp_path, hub):
    """A page elsewhere posting text/plain (no preflight) is refused before any work: no pull
    reaches the Hub, no copy, no delete, no chat job; and the same requests from an allowed
    origin do act, so it is the Origin that stopped them."""
    manifest = write_model(tmp_path, OTHER)
    engine = FakeEngine()
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path, engine=engine) as stack, \
            stack.client() as http:
        await async_wait_until(lambda: _listed(http, OTHER), 10, f"{OTHER} in /api/tags")
        before_jobs = await job_keys(stack)
        evil = {"Origin": EVIL, "Content-Type": "text/plain"}
        attempts = [
            ("POST", "/api/pull", {"model": "evil-org/evil-model", "stream": False}),
            ("POST", "/api/copy", {"source": OTHER, "destination": "stolen"}),
            ("DELETE", "/api/delete", {"model": OTHER}),
            ("POST", "/api/generate", {"model": MODEL, "keep_alive": 0}),
            ("POST", "/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
            ("GET", "/api/tags", None),
            ("GET", "/", None),
            ("GET", "/health", None),
        ]
        for method, path, body in attempts:
            r = await http.request(method, path, headers=evil, content=json.dumps(body) if body else None)
            assert r.status_code == 403, (path, r.text)
            message = r.json()["error"]
            assert f"'{EVIL}'" in message and f"OLLAMA_ORIGINS={EVIL}" in message, message
            assert "access-control-allow-origin" not in r.headers
        r = await http.post("/v1/chat/completions", headers=evil,
                            content=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert "OLLAMA_ORIGINS" in r.json()["error"]["message"]
        r = await http.options("/api/copy", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers

        assert hub.requests == []
        assert await tags(http) == {OTHER}
        assert (stack.pull_worker.store.model_dir(manifest) / "model.safetensors").exists()
        assert engine.started == []
        assert await job_keys(stack) == before_jobs

        # The control: an allowed origin's identical requests do act.
        allowed = {"Origin": APP, "Content-Type": "text/plain"}
        r = await http.post("/api/copy", headers=allowed, content=json.dumps({"source": OTHER, "destination": "kept"}))
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
        await async_wait_until(lambda: _listed(http, "kept:latest"), 10, "kept in /api/tags")
        r = await http.post("/api/pull", headers=allowed,
                            content=json.dumps({"model": "evil-org/evil-model", "stream": False}))
        assert r.headers["access-control-allow-origin"] == APP
        assert hub.requests, "the allowed pull should have asked the Hub"


async def _listed(http, name: str) -> bool:
    return name in await tags(http)


async def test_defaults_env_and_settings_add_origins(redis_server, monkeypatch):
    monkeypatch.setenv("OLLAMA_ORIGINS", "https://*.corp.example, moz-extension://*")
    async with fake_stack(redis_server.url, origins="https://app.example.com,chrome-extension://abc") as stack, \
            stack.client() as http:
        allowed = [APP, "http://127.0.0.1:8080", "https://0.0.0.0", "http://[::1]:3000", "app://obsidian.md",
                   "tauri://localhost", "vscode-webview://x1", "https://app.example.com", "chrome-extension://abc",
                   "https://chat.corp.example", "moz-extension://42"]
        for origin in allowed:
            r = await http.get("/api/version", headers={"Origin": origin})
            assert r.status_code == 200, (origin, r.text)
            assert r.headers["access-control-allow-origin"] == origin
            assert "Origin" in r.headers["vary"]
        for origin in (EVIL, "https://example.com", "chrome-extension://other", "https://corp.example", "null"):
            r = await http.get("/api/version", headers={"Origin": origin})
            assert r.status_code == 403, origin
        # No Origin (curl, SDKs, other servers): as before, no CORS headers.
        r = await http.get("/api/version")
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


async def test_star_allows_every_origin(redis_server):
    async with fake_stack(redis_server.url, origins="*") as stack, stack.client() as http:
        r = await http.get("/api/tags", headers={"Origin": "https://any.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://any.example"


async def test_preflight_before_auth_and_streaming_with_cors(redis_server):
    """A browser app sends its preflight without the key; the preflight must be granted, the
    key then checked, and a streamed answer must arrive in pieces with the CORS headers."""
    engine = FakeEngine(step_s=0.02)
    async with fake_stack(redis_server.url, engine=engine, api_key="sekret") as stack, stack.client() as http:
        r = await http.options("/api/chat", headers={
            "Origin": APP, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"})
        assert r.status_code == 204, r.text
        assert r.headers["access-control-allow-origin"] == APP
        methods = r.headers["access-control-allow-methods"].split(",")
        assert {"GET", "POST", "DELETE", "HEAD", "OPTIONS"} <= set(methods)
        granted = {h.lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type", "x-stainless-os", "openai-beta", "anthropic-version",
                "x-api-key"} <= granted
        assert "Origin" in r.headers["vary"] and int(r.headers["access-control-max-age"]) > 0

        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        r = await http.post("/api/chat", headers={"Origin": APP}, json=body)
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == APP  # readable by the app
        r = await http.post("/api/chat", headers={"Origin": EVIL, "Authorization": "Bearer sekret"}, json=body)
        assert r.status_code == 403 and "OLLAMA_ORIGINS" in r.json()["error"]

        pieces: list[bytes] = []
        async with http.stream("POST", "/api/chat", json=body,
                               headers={"Origin": APP, "Authorization": "Bearer sekret"}) as r:
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
            async for piece in r.aiter_raw():
                pieces.append(piece)
        lines = [json.loads(line) for line in b"".join(pieces).splitlines()]
        assert len(pieces) > 3 and lines[-1]["done"] is True
        assert "".join(line["message"]["content"] for line in lines).startswith("tok0")


async def test_host_check_when_bound_to_loopback(redis_server):
    async with fake_stack(redis_server.url) as stack, stack.client() as http:
        port = stack.base_url.rsplit(":", 1)[1]
        for host in ("evil.example", f"rebind.test:{port}", "localhost.evil.example"):
            r = await http.get("/api/tags", headers={"Host": host})
            assert r.status_code == 403, host
            message = r.json()["error"]
            assert "DNS rebinding" in message and "VLLAMA_HOST" in message and "127.0.0.1" in message
        # A rebinding page is same-origin to its own name: its Origin passes, its Host does not.
        r = await http.post("/api/copy", headers={"Host": f"rebind.test:{port}", "Origin": f"http://rebind.test:{port}"},
                            content=json.dumps({"source": MODEL, "destination": "x"}))
        assert r.status_code == 403 and "rebinding" in r.json()["error"]
        r = await http.get("/v1/models", headers={"Host": "evil.example"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"app.localhost:{port}",
                     "nas.local", "192.168.0.2"):
            r = await http.get("/api/tags", headers={"Host": host})
            assert r.status_code == 200, host


async def test_no_host_check_when_bound_to_all_addresses(redis_server):
    async with fake_stack(redis_server.url, host="0.0.0.0") as stack, stack.client() as http:
        port = stack.base_url.rsplit(":", 1)[1]
        r = await http.get("/api/tags", headers={"Host": f"gpu-box.example:{port}"})
        assert r.status_code == 200
        # Same-origin (a page this server's name served, e.g. /docs): no CORS needed or added.
        r = await http.get("/api/tags", headers={"Host": f"gpu-box.example:{port}",
                                                 "Origin": f"http://gpu-box.example:{port}"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        # The Origin check still holds for other sites.
        r = await http.get("/api/tags", headers={"Host": f"gpu-box.example:{port}", "Origin": EVIL})
        assert r.status_code == 403
