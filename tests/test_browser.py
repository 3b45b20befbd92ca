"""What web pages can do to a local server, tried in a real headless Chromium against the
fake stack (real Redis, real HTTP, the real pull worker; only the model is simulated).

Made-up names (evil.test, rebind.test) resolve to 127.0.0.1 inside the browser, so a page
from a "foreign site" and a DNS-rebinding page are served on this machine with no network:
* a page on another site fires text/plain POSTs (no preflight) at the API: nothing happens;
* a rebinding page, same-origin to the API under its foreign name, cannot read answers;
* a page on an allowed origin chats through fetch() and reads the stream piece by piece.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import pytest_asyncio

from tests.fake_stack import MODEL, fake_stack
from tests.harness import async_wait_until
from tests.hub_standin import HubStandin, isolate_hf_client
from tests.model_factory import write_model
from workers.fake_engine import FakeEngine

CHROMIUM = Path("/usr/bin/chromium")
OTHER = "other:1b"
BLANK = b"<!doctype html><html><head><title>page</title></head><body></body></html>"


class _Blank(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(BLANK)))
        self.end_headers()
        self.wfile.write(BLANK)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def pages() -> Iterator[int]:
    """A web server for the pages (any path: a blank page); its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Blank)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser() -> AsyncIterator[object]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium; "
                    "run scripts/install.sh --test (it installs it)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox",  # the tests may run as root
            "--no-proxy-server",
            "--host-resolver-rules=MAP evil.test 127.0.0.1, MAP rebind.test 127.0.0.1",
            # Recent Chromium blocks a page it took for public from reaching loopback; Firefox,
            # Safari and older Chromium do not, so the server must hold on its own: test that.
            "--disable-features=LocalNetworkAccessChecks",
        ])
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty Hub stand-in: a pull that gets anywhere asks it for the repository."""
    monkeypatch.delenv("OLLAMA_ORIGINS", raising=False)
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    isolate_hf_client(monkeypatch, tmp_path / "hf_home")
    with HubStandin() as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        yield standin


async def tags(http) -> set[str]:
    return {m["name"] for m in (await http.get("/api/tags")).json()["models"]}


async def _listed(http, name: str) -> bool:
    return name in await tags(http)


ATTACK = """async ({api, other, model}) => {
  const attempts = [
    ["POST", "/api/pull", {model: "evil-org/evil-model", stream: false}],
    ["POST", "/api/copy", {source: other, destination: "stolen"}],
    ["DELETE", "/api/delete", {model: other}],
    ["POST", "/api/generate", {model, keep_alive: 0}],
  ];
  const out = [];
  for (const [method, path, body] of attempts) {
    const init = {method, headers: {"Content-Type": "text/plain"}, body: JSON.stringify(body)};
    try {
      const r = await fetch(api + path, init);
      out.push(`${path}: read ${r.status} ${await r.text()}`);
    } catch (e) {
      out.push(`${path}: ${e.name}`);
    }
    if (method === "POST") {  // fire and forget: the answer is opaque, the request still goes out
      try { await fetch(api + path, {...init, mode: "no-cors"}); } catch (e) {}
    }
  }
  return out;
}"""


async def test_a_page_on_another_site_cannot_pull_copy_or_delete(redis_server, tmp_path, hub, browser, pages):
    manifest = write_model(tmp_path, OTHER)
    engine = FakeEngine()
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path, engine=engine) as stack, \
            stack.client() as http:
        await async_wait_until(lambda: _listed(http, OTHER), 10, f"{OTHER} in /api/tags")
        page = await browser.new_page()
        try:
            await page.goto(f"http://evil.test:{pages}/innocent.html")
            results = await page.evaluate(ATTACK, {"api": stack.base_url, "other": OTHER, "model": MODEL})
        finally:
            await page.close()
        # fetch() fails for the page (no CORS grant), whatever the server did ...
        assert all(r.endswith("TypeError") for r in results), results
        # ... and the server did nothing.
        assert hub.requests == [], "a pull reached the Hub"
        assert await tags(http) == {OTHER}
        assert (stack.pull_worker.store.model_dir(manifest) / "model.safetensors").exists()
        assert engine.started == []


REBOUND = """async ({other}) => {
  const listing = await fetch("/api/tags");
  const copy = await fetch("/api/copy", {method: "POST", headers: {"Content-Type": "application/json"},
                                         body: JSON.stringify({source: other, destination: "stolen"})});
  return {listing: listing.status, body: await listing.text(), copy: copy.status};
}"""


async def test_a_dns_rebinding_page_cannot_read_answers(redis_server, tmp_path, browser):
    """The attacker's page comes from rebind.test:<api port> (its first DNS answer, here the
    test answering for it); then the name points at 127.0.0.1, and the page's same-origin
    requests reach the API under the foreign name."""
    write_model(tmp_path, OTHER)
    async with fake_stack(redis_server.url, pull_worker=True, home=tmp_path) as stack, stack.client() as http:
        await async_wait_until(lambda: _listed(http, OTHER), 10, f"{OTHER} in /api/tags")
        port = stack.base_url.rsplit(":", 1)[1]
        origin = f"http://rebind.test:{port}"
        page = await browser.new_page()
        try:
            await page.route(f"{origin}/attack.html",
                             lambda route: route.fulfill(body=BLANK, content_type="text/html"))
            await page.goto(f"{origin}/attack.html")
            assert await page.evaluate("location.origin") == origin
            seen = await page.evaluate(REBOUND, {"other": OTHER})
        finally:
            await page.close()
        assert seen["listing"] == 403 and OTHER not in seen["body"] and MODEL not in seen["body"], seen
        assert "DNS rebinding" in json.loads(seen["body"])["error"]
        assert seen["copy"] == 403
        assert await tags(http) == {OTHER}


CHAT = """async ({api, key, model}) => {
  const read = async (response) => {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let reads = 0, text = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      reads += 1;
      text += decoder.decode(value, {stream: true});
    }
    return {status: response.status, reads, text};
  };
  const messages = [{role: "user", content: "hi"}];
  const auth = {"Content-Type": "application/json", "Authorization": "Bearer " + key};
  const ollama = await read(await fetch(api + "/api/chat", {method: "POST", headers: auth,
                                                          body: JSON.stringify({model, messages})}));
  const openai = await read(await fetch(api + "/v1/chat/completions", {
    method: "POST",
    headers: {...auth, "OpenAI-Beta": "assistants=v2", "X-Stainless-Lang": "js", "X-Stainless-OS": "Linux",
              "X-Stainless-Retry-Count": "0", "X-Stainless-Timeout": "600"},
    body: JSON.stringify({model, messages, stream: true})}));
  const denied = await fetch(api + "/api/tags");  // no key: the app can read why
  return {ollama, openai, denied: {status: denied.status, body: await denied.text()}};
}"""


async def test_a_page_on_an_allowed_origin_chats_with_streaming(redis_server, browser, pages):
    """http://localhost:<port> calling http://127.0.0.1:<api port> is cross-origin: the JSON
    body and the key make the browser send preflights, which must be granted without a key."""
    async with fake_stack(redis_server.url, engine=FakeEngine(step_s=0.03), api_key="sekret") as stack:
        page = await browser.new_page()
        try:
            await page.goto(f"http://localhost:{pages}/app.html")
            got = await page.evaluate(CHAT, {"api": stack.base_url, "key": "sekret", "model": MODEL})
        finally:
            await page.close()
    ollama, openai = got["ollama"], got["openai"]
    assert ollama["status"] == 200 and ollama["reads"] > 3, ollama
    lines = [json.loads(line) for line in ollama["text"].splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
    assert "".join(line["message"]["content"] for line in lines).startswith("tok0 tok1")
    assert openai["status"] == 200 and openai["reads"] > 3, openai
    assert openai["text"].rstrip().endswith("data: [DONE]")
    assert got["denied"]["status"] == 401 and json.loads(got["denied"]["body"])["error"]
