"""What the fault tests observe: clients' streams, where each job ran, how often it ran.

A stream is read line by line with the time each line arrived, so a test can say how long a
client waited for its final line after a fault instead of only whether it got one. The fake
engine answers ``tok0 tok1 tok2 ...``; a client's text must be exactly such a prefix, so a
token delivered twice (or out of order) shows.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from redis.asyncio import Redis

from common.tasks import cancel_and_wait
from tests.multihost.cluster import FAKE_MODEL


@dataclass
class Stream:
    """One streaming /api/generate request as its client saw it."""

    label: str
    started_at: float = field(default_factory=time.monotonic)
    status: int | None = None
    lines: list[dict] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    ended_at: float | None = None
    end: str = "open"  # "done", "error", "eof" (closed without a final line), "exception: ...", "http <n>"
    first_token: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def text(self) -> str:
        return "".join(line.get("response", "") for line in self.lines)

    @property
    def final(self) -> dict | None:
        return self.lines[-1] if self.lines and self.end in ("done", "error") else None

    @property
    def tokens(self) -> int:
        return sum(1 for line in self.lines if line.get("response"))

    def final_within(self, since: float) -> float | None:
        """Seconds from ``since`` to the final line (an answer or an error), None if none came."""
        return None if self.ended_at is None or self.end not in ("done", "error") else self.ended_at - since

    def duplicate_problem(self) -> str | None:
        """Why the text is not exactly ``tok0 .. tokN`` once each, in order (None: it is)."""
        return counting_text_problem(self.text, self.final)


def counting_text_problem(text: str, final: dict | None = None) -> str | None:
    pieces = text.split(" ")
    if pieces and pieces[-1] == "":
        pieces.pop()
    expected = [f"tok{i}" for i in range(len(pieces))]
    if pieces != expected:
        first_bad = next(i for i, (a, b) in enumerate(zip(pieces, expected, strict=False)) if a != b)
        return f"token {first_bad} is {pieces[first_bad]!r}, expected {expected[first_bad]!r} (repeated or lost)"
    if final and final.get("done") and final.get("eval_count") not in (None, len(pieces)):
        return f"{len(pieces)} tokens received but eval_count says {final['eval_count']}"
    return None


def start_stream(client: httpx.AsyncClient, label: str, num_predict: int, *,
                 stop_after_s: float = 300, **extra: object) -> Stream:
    """Start streaming one generation, prompt ``label`` (unique per client: it finds the job
    in Redis); ``stream.task`` ends with the stream, ``stream.first_token`` is set on the first."""
    s = Stream(label)
    body = {"model": FAKE_MODEL, "prompt": label, "options": {"num_predict": num_predict}, **extra}
    s.task = asyncio.create_task(_read_stream(client, s, body, stop_after_s))
    return s


async def stream_generate(client: httpx.AsyncClient, label: str, num_predict: int, **kw: object) -> Stream:
    s = start_stream(client, label, num_predict, **kw)
    await s.task
    return s


async def _read_stream(client: httpx.AsyncClient, s: Stream, body: dict, stop_after_s: float) -> Stream:
    try:
        async with asyncio.timeout(stop_after_s):
            async with client.stream("POST", "/api/generate", json=body, timeout=httpx.Timeout(stop_after_s)) as r:
                s.status = r.status_code
                async for raw in r.aiter_lines():
                    if not raw:
                        continue
                    line = json.loads(raw)
                    s.lines.append(line)
                    s.times.append(time.monotonic())
                    if line.get("response"):
                        s.first_token.set()
                    if "error" in line:
                        s.end = "error"
                        break
                    if line.get("done"):
                        s.end = "done"
                        break
                else:
                    s.end = "eof" if r.status_code == 200 else f"http {r.status_code}"
    except TimeoutError:
        s.end = "timeout"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        s.end = f"exception: {exc!r}"
    s.ended_at = time.monotonic()
    s.first_token.set()  # nobody waits forever on a stream that ended without a token
    return s


async def generate_once(client: httpx.AsyncClient, label: str, num_predict: int = 10,
                        timeout_s: float = 30) -> tuple[int | None, dict]:
    """A non-streaming /api/generate; (status, body), or (None, {"error": ...}) on no answer."""
    try:
        r = await client.post("/api/generate", json={"model": FAKE_MODEL, "prompt": label, "stream": False,
                                                     "options": {"num_predict": num_predict}}, timeout=timeout_s)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, {"error": r.text[:200]}
    except httpx.HTTPError as exc:
        return None, {"error": repr(exc)}


# ---------------------------------------------------------------- where jobs ran


async def job_index(redis: Redis) -> dict[str, dict]:
    """Prompt -> job for every generation job arq still knows (queued, running, or with a
    stored result): ``{"job_id", "record"}``, the record being vllama:job:<id> (or None).

    The prompt is how a test tells its clients apart; arq's job and result keys hold the job's
    spec (JSON), and the record names the worker that took it."""
    found: dict[str, str] = {}
    for pattern in ("arq:job:*", "arq:result:*"):
        async for key in redis.scan_iter(pattern, count=1000):
            raw = await redis.get(key)
            if raw is None:
                continue
            try:
                payload = json.loads(raw)
            except ValueError:
                continue
            for arg in payload.get("a") or []:
                if isinstance(arg, dict) and "prompt" in arg and "job_id" in arg:
                    found[str(arg["prompt"])] = arg["job_id"]
    records = await redis.mget([f"vllama:job:{j}" for j in found.values()]) if found else []
    return {prompt: {"job_id": job_id, "record": json.loads(rec) if rec else None}
            for (prompt, job_id), rec in zip(found.items(), records, strict=True)}


class JobWatcher:
    """Prompt -> job and its latest record, remembered while the test runs.

    A streamed job leaves no trace in arq once it ends (no result is kept for an answer its
    client already has) and its record expires a minute later, so a test that asks afterwards
    which worker served it must have watched: this polls every ``interval_s`` and keeps the
    last record it saw of every job. One poll at a time (a lock), and stopping waits for the
    current poll instead of cancelling a Redis command halfway."""

    def __init__(self, redis: Redis, interval_s: float = 0.1) -> None:
        self._redis = redis
        self._interval_s = interval_s
        self._seen: dict[str, dict] = {}
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> JobWatcher:
        await self._poll()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def index(self) -> dict[str, dict]:
        """What :func:`job_index` gives, for every job seen so far, records as of now."""
        await self._poll()
        return {prompt: dict(entry) for prompt, entry in self._seen.items()}

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self._interval_s)
                return
            except TimeoutError:
                pass
            try:
                await self._poll()
            except Exception:  # noqa: BLE001 - Redis may be away in a fault test; poll again
                pass

    async def _poll(self) -> None:
        async with self._lock:
            for prompt, entry in (await job_index(self._redis)).items():
                self._seen.setdefault(prompt, {"job_id": entry["job_id"], "record": None})
            records = await job_records(self._redis, [e["job_id"] for e in self._seen.values()])
            for entry in self._seen.values():
                record = records.get(entry["job_id"])
                if record is not None:
                    entry["record"] = record


async def job_records(redis: Redis, job_ids: list[str]) -> dict[str, dict | None]:
    out: dict[str, dict | None] = {}
    for i in range(0, len(job_ids), 500):
        chunk = job_ids[i:i + 500]
        raws = await redis.mget([f"vllama:job:{j}" for j in chunk])
        out.update({j: json.loads(r) if r else None for j, r in zip(chunk, raws, strict=True)})
    return out


# arq logs each start of a job: "  0.01s → <job id>:generate(...)" (and "try=N" on a re-run).
_ARQ_START = re.compile(r"→ ([^\s:()]+):generate\(")


def starts_in_log(log_text: str) -> list[str]:
    """Job ids in the order a worker's log says it started them, once per start."""
    return _ARQ_START.findall(log_text)


def starts_by_worker(logs: dict[str, Path | str]) -> dict[str, list[str]]:
    """Host -> job ids its worker started (from each worker's log)."""
    out: dict[str, list[str]] = {}
    for host, log in logs.items():
        text = log.read_text(errors="replace") if isinstance(log, Path) else log
        out[host] = starts_in_log(text)
    return out


class StartFrameCounter:
    """Counts the start frames a worker publishes each time it starts a job (pattern
    subscription to every job's channel): an execution count that needs no log line.

    Only for async jobs: a pattern subscriber counts as a listener, and a streaming job
    whose client has gone would no longer notice it is alone."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self.starts: dict[str, list[str]] = {}  # job id -> worker ids, one per start
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> StartFrameCounter:
        self._task = asyncio.create_task(self._read())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.sleep(0.5)  # the last frames in flight
        await cancel_and_wait(self._task)

    async def _read(self) -> None:
        async with self._redis.pubsub() as ps:
            await ps.psubscribe("vllama:frames:*")
            self._ready.set()
            while True:
                msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is None or msg.get("type") != "pmessage":
                    continue
                data = msg["data"]
                if b'"start"' not in data:
                    continue
                frame = json.loads(data)
                if frame.get("type") == "start":
                    channel = msg["channel"].decode()
                    self.starts.setdefault(channel.rsplit(":", 1)[-1], []).append(frame.get("worker_id", "?"))
