"""Open WebUI against vLLama, for retrieval: Open WebUI set to embed with vLLama (its "Ollama"
embedding engine, model all-minilm) indexes a document, finds the right passage for a question
by those embeddings, and a chat about the document answers from it with smollm2:135m.

It starts vLLama (`vllama serve` on a free port) and Open WebUI (from its own virtual
environment, made here the first time: it is large, ~3 GB, and pins its own packages, so it
is not part of the test suite's environment), drives Open WebUI through its HTTP API as its
web page does, and prints what each step saw. Nothing leaves the machine: Open WebUI runs in
offline mode with every feature that would fetch something turned off.

    .venv/bin/python scripts/check_openwebui.py                 # makes .openwebui/ if missing
    .venv/bin/python scripts/check_openwebui.py --webui-venv /path/to/venv

Exit status 0 when every check held.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.embedded_redis import free_port  # noqa: E402

OPEN_WEBUI = "open-webui==0.12.4"
CHAT_MODEL, EMBED_MODEL = "smollm2:135m", "all-minilm"
# A document whose answer is in one passage among others about other things, so the passage
# retrieval returns shows the embeddings (not chance) chose it.
PASSAGES = [
    "The Zorblax vault lies beneath the old lighthouse of Port Meridian. Its door opens with the code 7342, "
    "which only the harbour master knows.",
    "Sourdough bread rises slowly because wild yeast and lactic bacteria ferment the dough overnight, which "
    "gives the crumb its sour taste and open holes.",
    "The 1998 regional chess final was won by Ilse Marten in forty-one moves with a queen sacrifice on move 30.",
    "Monarch butterflies migrate thousands of kilometres each autumn to the mountain forests of central Mexico.",
]
QUESTION = "What code opens the door of the Zorblax vault?"
# Put so that the 135M model quotes its context rather than making up a code.
CHAT_QUESTION = "Which number opens the Zorblax vault? Answer with the number only."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--webui-venv", type=Path, default=ROOT / ".openwebui")
    args = parser.parse_args()
    webui = args.webui_venv / "bin" / "open-webui"
    if not webui.exists():
        _make_venv(args.webui_venv)
    with tempfile.TemporaryDirectory(prefix="vllama-openwebui-") as tmp:
        vllama_port, webui_port = free_port(), free_port()
        vllama_url, webui_url = f"http://127.0.0.1:{vllama_port}", f"http://127.0.0.1:{webui_port}"
        procs = [_start([str(ROOT / ".venv" / "bin" / "vllama"), "serve"], Path(tmp) / "vllama.log",
                        OLLAMA_HOST=f"127.0.0.1:{vllama_port}"),
                 _start([str(webui), "serve", "--host", "127.0.0.1", "--port", str(webui_port)],
                        Path(tmp) / "open-webui.log", **_webui_env(vllama_url, Path(tmp) / "data"))]
        try:
            _wait(f"{vllama_url}/health", "vLLama", procs)
            _wait(f"{webui_url}/health", "Open WebUI", procs)
            return _check(vllama_url, webui_url)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
            print(f"(logs were in {tmp}: kept only while this ran)")


def _make_venv(path: Path) -> None:
    print(f"making {path} with {OPEN_WEBUI} (once; several minutes)")
    # The interpreter this venv was made from, so Open WebUI's venv is not nested in ours.
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q"]
    # torch first, pinned as vLLama's engine pins it, so Open WebUI's range does not pull a newer build.
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, OPEN_WEBUI], check=True)


def _webui_env(vllama_url: str, data_dir: Path) -> dict[str, str]:
    return {
        "DATA_DIR": str(data_dir), "WEBUI_SECRET_KEY": "check", "WEBUI_AUTH": "False",
        "OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "false",
        "ENABLE_OPENAI_API": "false", "ENABLE_OLLAMA_API": "true", "OLLAMA_BASE_URL": vllama_url,
        "RAG_EMBEDDING_ENGINE": "ollama", "RAG_EMBEDDING_MODEL": EMBED_MODEL, "RAG_OLLAMA_BASE_URL": vllama_url,
        "RAG_RERANKING_MODEL": "", "ENABLE_RAG_HYBRID_SEARCH": "false", "RAG_TOP_K": "1",
        "CHUNK_SIZE": "200", "CHUNK_OVERLAP": "0",
        "ENABLE_TITLE_GENERATION": "false", "ENABLE_TAGS_GENERATION": "false",
        "ENABLE_FOLLOW_UP_GENERATION": "false", "ENABLE_AUTOCOMPLETE_GENERATION": "false",
        "ENABLE_RETRIEVAL_QUERY_GENERATION": "false", "ENABLE_SEARCH_QUERY_GENERATION": "false",
    }


def _start(command: list[str], log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(command, env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(url: str, what: str, procs: list[subprocess.Popen], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a process exited while waiting for {what}; see its log")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                print(f"{what} is up")
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{what} did not come up within {timeout_s:.0f} s")


def _check(vllama_url: str, webui_url: str) -> int:
    failures = []

    def expect(ok: bool, what: str) -> None:
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    http = httpx.Client(base_url=webui_url, timeout=600)
    token = http.post("/api/v1/auths/signin", json={"email": "", "password": ""}).json()["token"]
    http.headers["Authorization"] = f"Bearer {token}"

    models = [m["id"] for m in http.get("/api/models").json()["data"]]
    expect(CHAT_MODEL in models, f"Open WebUI lists vLLama's models ({', '.join(models)})")

    embeds_before = _embed_requests(vllama_url)
    upload = http.post("/api/v1/files/", params={"process": "true", "process_in_background": "false"},
                       files={"file": ("zorblax.txt", "\n\n".join(PASSAGES).encode(), "text/plain")})
    expect(upload.status_code == 200, f"the document is uploaded and indexed (HTTP {upload.status_code})")
    file = upload.json()
    status = (http.get(f"/api/v1/files/{file['id']}").json().get("data") or {}).get("status")
    expect(status == "completed", f"indexing finished (status {status!r})")
    embeds = _embed_requests(vllama_url) - embeds_before
    expect(embeds > 0, f"indexing embedded through vLLama ({embeds:g} embedding requests)")

    found = http.post("/api/v1/retrieval/query/doc", json={
        "collection_name": f"file-{file['id']}", "query": QUESTION, "k": 1}).json()
    top = found["documents"][0][0] if found.get("documents") and found["documents"][0] else ""
    expect("7342" in top, f"the question finds the vault's passage by its embedding: {top[:80]!r}...")

    def chat(**extra: object) -> dict:
        r = http.post("/api/chat/completions", json={
            "model": CHAT_MODEL, "stream": False, "messages": [{"role": "user", "content": CHAT_QUESTION}],
            "params": {"temperature": 0}, **extra})
        expect(r.status_code == 200, f"a chat {'with' if extra else 'without'} the document is answered "
                                     f"(HTTP {r.status_code})")
        return r.json() if r.status_code == 200 else {}

    plain, body = chat(), chat(files=[{"type": "file", "id": file["id"]}])
    answer = (body.get("choices") or [{}])[0].get("message", {}).get("content", "")
    sources = [doc for source in body.get("sources") or [] for doc in source.get("document", [])]
    expect(any("7342" in doc for doc in sources), "the answer's sources hold the vault's passage")
    with_doc, without = (b.get("usage", {}).get("prompt_eval_count", 0) for b in (body, plain))
    expect(with_doc > without + 40, f"the passage went to vLLama with the question ({with_doc} prompt tokens, "
                                    f"{without} without the document)")
    expect("7342" in answer, f"the answer uses it: {answer[:200]!r}")
    print("all checks held" if not failures else f"{len(failures)} checks failed")
    return 1 if failures else 0


def _embed_requests(vllama_url: str) -> float:
    """Embedding requests vLLama has served (its /metrics), whichever endpoint they came to."""
    total = 0.0
    for line in httpx.get(f"{vllama_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllama_http_requests_total{") and "embed" in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


if __name__ == "__main__":
    sys.exit(main())
