"""Commands that talk to a running server, with progress bars: `vllama pull` and `vllama batch`.

The server is OLLAMA_HOST (as the ollama CLI finds it), else 127.0.0.1:11434; VLLAMA_API_KEY,
when set, is sent as the bearer token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from common.settings import DEFAULT_PORT, parse_ollama_host

POLL_S = 1.0


def client() -> httpx.Client:
    host, port = parse_ollama_host(os.environ.get("OLLAMA_HOST") or f"127.0.0.1:{DEFAULT_PORT}")
    key = os.environ.get("VLLAMA_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=f"http://{host}:{port}", headers=headers, timeout=httpx.Timeout(60, read=None))


def _fail(response: httpx.Response) -> None:
    try:
        body = response.json()
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("error")
    except (ValueError, AttributeError, KeyError):
        message = response.text
    sys.exit(f"error: {message or response.reason_phrase} (HTTP {response.status_code})")


def cmd_pull(args: argparse.Namespace) -> None:
    """Pull a model, one bar per file, as `ollama pull` shows it."""
    bars: dict[str, tqdm] = {}
    try:
        with client() as http, http.stream("POST", "/api/pull", json={"model": args.model}) as r:
            if r.status_code != 200:
                r.read()
                _fail(r)
            for raw in r.iter_lines():
                line = json.loads(raw)
                if "error" in line:
                    sys.exit(f"error: {line['error']}")
                if "digest" in line:
                    bar = bars.get(line["digest"])
                    if bar is None:
                        bar = bars[line["digest"]] = tqdm(total=line["total"], unit="B", unit_scale=True,
                                                          unit_divisor=1024, desc=line["status"])
                    bar.update(line["completed"] - bar.n)
                else:
                    tqdm.write(line["status"])
    except httpx.ConnectError as exc:
        sys.exit(f"error: cannot reach the server ({exc}); start it with `vllama serve` or set OLLAMA_HOST")
    finally:
        for bar in bars.values():
            bar.close()


def cmd_batch(args: argparse.Namespace) -> None:
    """Upload a JSONL file, run it as an OpenAI batch with a bar of finished lines, and save
    the output (and error) file beside it."""
    source = Path(args.file)
    if not source.is_file():
        sys.exit(f"{source}: no such file; give a JSONL file of batch requests")
    try:
        with client() as http:
            upload = http.post("/v1/files", files={"file": (source.name, source.read_bytes())}, data={"purpose": "batch"})
            if upload.status_code != 200:
                _fail(upload)
            created = http.post("/v1/batches", json={"input_file_id": upload.json()["id"], "endpoint": args.endpoint,
                                                     "completion_window": "24h"})
            if created.status_code != 200:
                _fail(created)
            batch = created.json()
            print(f"batch {batch['id']}: {batch['request_counts']['total']} requests", file=sys.stderr)
            if args.no_wait:
                print(batch["id"])
                return
            batch = _follow(http, batch)
            _save_results(http, batch, source)
    except httpx.ConnectError as exc:
        sys.exit(f"error: cannot reach the server ({exc}); start it with `vllama serve` or set OLLAMA_HOST")


def _follow(http: httpx.Client, batch: dict[str, Any]) -> dict[str, Any]:
    with tqdm(total=batch["request_counts"]["total"], unit="req", desc="batch") as bar:
        while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(POLL_S)
            r = http.get(f"/v1/batches/{batch['id']}")
            if r.status_code != 200:
                _fail(r)
            batch = r.json()
            counts = batch["request_counts"]
            bar.update(counts["completed"] + counts["failed"] - bar.n)
    return batch


def _save_results(http: httpx.Client, batch: dict[str, Any], source: Path) -> None:
    if batch["status"] == "failed":
        errors = (batch.get("errors") or {}).get("data") or []
        sys.exit("error: the batch failed: " + "; ".join(f"line {e.get('line')}: {e['message']}" for e in errors))
    counts = batch["request_counts"]
    print(f"batch {batch['id']} {batch['status']}: {counts['completed']} completed, {counts['failed']} failed",
          file=sys.stderr)
    for key, suffix in (("output_file_id", ".output.jsonl"), ("error_file_id", ".errors.jsonl")):
        if batch.get(key):
            target = source.with_name(source.stem + suffix)
            target.write_bytes(http.get(f"/v1/files/{batch[key]}/content").content)
            print(f"wrote {target}", file=sys.stderr)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="pull a model on the running server, with progress bars")
    p.add_argument("model")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("batch", help="run a JSONL file of requests as an OpenAI batch, with a progress bar")
    p.add_argument("file", help="JSONL: one {custom_id, method, url, body} request per line")
    p.add_argument("--endpoint", default="/v1/chat/completions",
                   choices=["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
    p.add_argument("--no-wait", action="store_true", help="print the batch id and return")
    p.set_defaults(func=cmd_batch)
