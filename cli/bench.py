"""`vllama bench`: what the stack costs compared with the engine alone, and with vLLM's server.

One run, same model, same prompts, same greedy settings, two ways (the default):
  engine  the engine in this process, requests submitted straight to it;
  stack   HTTP -> API -> Redis/arq -> worker (the same engine) -> pub/sub -> API -> HTTP,
          with redis-server, `vllama worker` and `vllama api` started as separate processes.
At each concurrency level it keeps that many requests in flight and reports output tokens
per second and the median time to first token, then the stack/engine ratio, and the CPU
time the API and the worker processes spent per thousand tokens.

``--peer`` compares instead vLLama's OpenAI endpoint with vLLM's own OpenAI server (same
model directory, same engine settings, same streamed /v1/completions requests over HTTP),
one after the other. ``--workers 1,2,4`` runs the stack alone with that many workers, to
show how throughput scales with token sources (the fake engine's stepwise pace caps each
worker at VLLAMA_MAX_NUM_SEQS tokens per step, as a GPU would).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from cli.load_client import StreamClient

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "What is a hash table?",
    "Give three tips for learning to cook.",
    "Describe a cat to someone who has never seen one.",
    "Why do leaves change color in autumn?",
    "Summarize the plot of a detective story.",
    "How does a bicycle stay upright?",
]


REPEATS = 3
VARY_LENGTH = False  # --vary-length


def length(num_predict: int, i: int) -> int:
    """Tokens asked of request ``i``: ``num_predict``, or with --vary-length spread evenly over
    0.5x to 1.5x of it (the same for every way measured). Answers of one length all start and
    end together, in waves; real answers differ, and their requests arrive spread out."""
    if not VARY_LENGTH:
        return num_predict
    return max(1, round(num_predict * (0.5 + (i * 0.6180339887) % 1.0)))


@dataclass
class Sample:
    ttft_s: float
    tokens: int


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    ttft_median_ms: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds during the run

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def cpu_ms_per_1k(self, process: str) -> float:
        return self.cpu_s.get(process, 0.0) * 1e6 / max(self.tokens, 1)


One = Callable[[int], Awaitable[Sample]]
CpuProbe = Callable[[], dict[str, float]]


async def run_level(one: One, concurrency: int, requests: int, cpu: CpuProbe | None = None) -> LevelResult:
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> Sample:
        async with gate:
            return await one(i)

    before = cpu() if cpu else {}
    start = time.perf_counter()
    samples = await asyncio.gather(*(gated(i) for i in range(requests)))
    wall = time.perf_counter() - start
    after = cpu() if cpu else {}
    return LevelResult(concurrency, requests, sum(s.tokens for s in samples), wall,
                       statistics.median(s.ttft_s for s in samples) * 1000,
                       {name: after[name] - before.get(name, 0.0) for name in after})


async def measure(one: One, levels: list[int], per_level, label: str, cpu: CpuProbe | None = None
                  ) -> list[LevelResult]:
    """Warm up at the highest level (so every batch shape has been seen), then run each level
    REPEATS times and keep the median run by throughput: two cores make single runs noisy."""
    from tqdm import tqdm

    top = max(levels)
    results = []
    with tqdm(total=1 + len(levels) * REPEATS, desc=label, unit="run", leave=False) as bar:
        await run_level(one, top, top)
        bar.update()
        for c in levels:
            runs = []
            for _ in range(REPEATS):
                runs.append(await run_level(one, c, per_level(c), cpu))
                bar.update()
            runs.sort(key=lambda r: r.tokens_per_s)
            results.append(runs[len(runs) // 2])
    return results


# ---------------------------------------------------------------- CPU time of processes


def cpu_seconds(pid: int, below: bool = True) -> float:
    """User + system CPU time of ``pid`` and (``below``) every process below it (an API with
    several processes, vLLM's engine process), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        p = int(entry.name)
        children.setdefault(int(fields[1]), []).append(p)  # fields[1]: the parent's pid
        times[p] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += times.get(p, 0.0)
        if below:
            todo.extend(children.get(p, []))
    return total


# ---------------------------------------------------------------- the engine alone


async def bench_engine(settings, levels: list[int], num_predict: int, per_level) -> list[LevelResult]:
    from common.models import canonical_name
    from common.protocol import ChatMessage, Sampling
    from workers.main import build_engine

    name = canonical_name(settings.model)
    engine = await asyncio.to_thread(build_engine, settings, name, await model_dir(settings))
    counter = iter(range(10**9))
    try:
        async def one(i: int) -> Sample:
            # The prompt's rendering and tokenizing count, as they do through the stack (in the
            # worker) and in vLLM's server: the same work either way, not the stack's.
            start = time.perf_counter()
            prompt = engine.encode_chat([ChatMessage(role="user", content=PROMPTS[i % len(PROMPTS)])])
            first = None
            tokens = 0
            tokens_asked = length(num_predict, i)
            sampling = Sampling(temperature=0, max_tokens=tokens_asked)
            async for delta in engine.generate(f"bench-{next(counter)}", prompt, sampling, tokens_asked):
                if first is None and delta.text:
                    first = time.perf_counter() - start
                tokens += delta.num_tokens
            return Sample(first or 0.0, tokens)

        return await measure(one, levels, per_level, "engine")
    finally:
        engine.close()


async def model_dir(settings) -> Path | None:
    """The model's directory on this machine (fetched or converted first if need be); None
    for the fake engine."""
    if settings.engine == "fake":
        return None
    from common.models import canonical_name
    from workers.pull import ensure_local
    from workers.store import ModelStore

    return await asyncio.to_thread(ensure_local, ModelStore(settings.model_cache), canonical_name(settings.model),
                                   None)


# ---------------------------------------------------------------- the stack, and vLLM's server


@dataclass
class Running:
    http: object  # aiohttp.ClientSession
    streams: StreamClient  # for the streamed answers measured
    pids: dict[str, list[int]]  # kind of process -> their pids, for cpu()

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far per kind of process; a worker's engine processes (vLLM's engine
        core: the model's compute) are counted apart from the worker's own. The load
        generator's own (this process: "client") is counted too: on a small machine every
        part takes from the same cores."""
        seconds = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in self.pids.items()}
        if "worker" in self.pids:
            seconds["engine"] = seconds["worker"]
            seconds["worker"] = sum(cpu_seconds(pid, below=False) for pid in self.pids["worker"])
            seconds["engine"] -= seconds["worker"]
        seconds["client"] = time.process_time()
        return seconds


@contextlib.asynccontextmanager
async def running_stack(settings, workers: int = 1):
    """redis-server, ``workers`` workers and the API as separate processes."""
    from cli.embedded_redis import EmbeddedRedis, free_port

    redis = EmbeddedRedis().start()
    port = free_port()
    env = {**os.environ, "VLLAMA_REDIS_URL": redis.url, "VLLAMA_MODEL": settings.model}
    command = [sys.executable, "-m", "cli"]
    worker_procs = [subprocess.Popen([*command, "worker"], env=env) for _ in range(workers)]
    api = subprocess.Popen([*command, "api", "--port", str(port)], env=env)
    procs = [*worker_procs, api]
    streams = StreamClient("127.0.0.1", port)
    try:
        async with _session(port, procs) as http:
            await _workers_ready(redis.url, workers, procs)  # all of them before the clock starts
            yield Running(http, streams,
                          {"api": [api.pid], "worker": [p.pid for p in worker_procs], "redis": [redis.pid]})
    finally:
        streams.close()
        _stop(procs)
        redis.stop()


async def _workers_ready(redis_url: str, count: int, procs, timeout_s: float = 900) -> None:
    from common import registry
    from common.redis_conn import connect

    redis = await connect(redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        while len([w for w in await registry.live_workers(redis) if w.state == "ready"]) < count:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a process exited during start-up; see its output above")
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} workers became ready")
            await asyncio.sleep(0.5)
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def running_vllm_server(settings, path: Path):
    """vLLM's own OpenAI server on the same model directory with the engine settings a
    vLLama worker would use (workers/engine.py, workers/main.py)."""
    from cli.embedded_redis import free_port
    from workers.cpu_defaults import engine_dtype, engine_threads
    from workers.engine import has_cuda

    port = free_port()
    cuda = has_cuda()
    env = dict(os.environ)
    if not cuda:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
        threads = engine_threads(cuda=cuda)  # the thread binding a worker would give its engine
        if threads is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = threads.bind
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
               "--served-model-name", settings.model, "--port", str(port), "--host", "127.0.0.1",
               "--dtype", engine_dtype(settings.dtype, cuda=cuda).dtype,
               "--max-num-seqs", str(settings.max_num_seqs or (256 if cuda else 64)),
               "--enable-prefix-caching", "--scheduling-policy", "priority"]
    if settings.max_model_len:
        command += ["--max-model-len", str(settings.max_model_len)]
    if (not cuda) if settings.enforce_eager is None else settings.enforce_eager:
        command.append("--enforce-eager")
    proc = subprocess.Popen(command, env=env)
    streams = StreamClient("127.0.0.1", port)
    try:
        async with _session(port, [proc], health="/health") as http:
            yield Running(http, streams, {"server": [proc.pid]})
    finally:
        streams.close()
        _stop([proc])


@contextlib.asynccontextmanager
async def _session(port: int, procs, health: str = "/health"):
    # aiohttp, not httpx, for the load: with its C parser the client takes ~8x less CPU per
    # token, which on a small machine would otherwise be taken from the server and counted
    # against it.
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=connector, timeout=timeout) as http:
        await _wait_healthy(http, list(procs), health)
        yield http


def _stop(procs) -> None:
    procs = list(procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


async def stream_generate(streams: StreamClient, body: dict) -> tuple[Sample, float]:
    """One streamed /api/generate: (time to first token and tokens, mean seconds between the
    reads that carried tokens). The client reads every byte but parses only the final line:
    on a small machine a client that parses each line takes CPU the server is measured on."""
    start = time.perf_counter()
    reply = await streams.post("/api/generate", json.dumps(body).encode())
    final = json.loads(reply.tail.rstrip(b"\n").rsplit(b"\n", 1)[-1])
    if reply.status != 200 or "error" in final:
        raise RuntimeError(final.get("error", final))
    first = reply.first_s - start
    between = (reply.last_s - reply.first_s) / (reply.reads - 1) if reply.reads > 1 else 0.0
    return Sample(first, final["eval_count"]), between


async def stream_completion(streams: StreamClient, body: dict) -> Sample:
    """One streamed OpenAI /v1/completions: time to first token, and tokens (from usage),
    read the same way."""
    start = time.perf_counter()
    reply = await streams.post("/v1/completions", json.dumps(
        {**body, "stream": True, "stream_options": {"include_usage": True}}).encode())
    if reply.status != 200:
        raise RuntimeError(reply.tail.decode(errors="replace"))
    events = [line for line in reply.tail.split(b"\n") if line.startswith(b"data: {")]
    usage = json.loads(events[-1][6:]).get("usage") if events else None
    if not usage:
        raise RuntimeError(f"the stream ended without usage: {reply.tail[-300:]!r}")
    return Sample(reply.first_s - start, usage["completion_tokens"])


def _generate_one(settings, streams: StreamClient, num_predict: int) -> One:
    async def one(i: int) -> Sample:
        body = {"model": settings.model, "prompt": PROMPTS[i % len(PROMPTS)],
                "options": {"temperature": 0, "num_predict": length(num_predict, i)}}
        return (await stream_generate(streams, body))[0]

    return one


def _completion_one(model: str, streams: StreamClient, num_predict: int) -> One:
    async def one(i: int) -> Sample:
        body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": length(num_predict, i),
                "temperature": 0}
        return await stream_completion(streams, body)

    return one


async def bench_stack(settings, levels: list[int], num_predict: int, per_level, workers: int = 1
                      ) -> list[LevelResult]:
    async with running_stack(settings, workers) as stack:
        return await measure(_generate_one(settings, stack.streams, num_predict), levels, per_level,
                             f"stack, {workers} worker(s)", stack.cpu)


async def bench_peer(settings, levels: list[int], num_predict: int, per_level
                     ) -> tuple[list[LevelResult], list[LevelResult]]:
    if settings.engine == "fake":
        raise SystemExit("--peer compares with vLLM's own server, which needs the real engine (unset VLLAMA_ENGINE)")
    path = await model_dir(settings)
    async with running_stack(settings) as stack:
        ours = await measure(_completion_one(settings.model, stack.streams, num_predict), levels, per_level,
                             "vLLama /v1/completions", stack.cpu)
    async with running_vllm_server(settings, path) as server:
        theirs = await measure(_completion_one(settings.model, server.streams, num_predict), levels, per_level,
                               "vLLM's server /v1/completions", server.cpu)
    return ours, theirs


async def bench_during_batch(settings, jobs: int, num_predict: int, samples: int = 3) -> None:
    """Time to first token of streamed requests sent one after another: idle, then behind a
    backlog of ``jobs`` batch-class jobs, then behind the same backlog sent as interactive
    jobs (which queue like any request: first come, first served). The first request of each
    is the one that meets the fullest backlog."""
    from tqdm import tqdm

    async with running_stack(settings) as stack:
        http = stack.http

        async def probe() -> list[tuple[Sample, float]]:
            return [await stream_generate(stack.streams, {"model": settings.model, "prompt": PROMPTS[i % len(PROMPTS)],
                                                 "options": {"temperature": 0, "num_predict": 16}})
                    for i in range(samples)]

        async def backlog(priority: str) -> list[str]:
            ids = []
            for i in tqdm(range(jobs), desc=f"{priority} backlog", unit="job", leave=False):
                body = {"model": settings.model, "prompt": PROMPTS[i % len(PROMPTS)], "priority": priority,
                        "options": {"temperature": 0, "num_predict": num_predict}}
                async with http.post("/api/jobs/generate", json=body) as r:
                    assert r.status == 202, await r.text()
                    ids.append((await r.json())["id"])
            await asyncio.sleep(2)  # the engine is full of it by now
            return ids

        async def cancel(ids: list[str]) -> None:
            for job_id in ids:  # those that ended answer 409, which is fine
                async with http.delete(f"/api/jobs/{job_id}"):
                    pass
            await asyncio.sleep(2)

        rows = [("idle", await probe())]
        for priority in ("batch", "interactive"):
            ids = await backlog(priority)
            rows.append((f"behind {jobs} {priority}-class jobs", await probe()))
            await cancel(ids)
    print()
    print(f"{'situation':<36} | {'first TTFT ms':>13} {'median TTFT ms':>14} | {'ms between tokens':>17}")
    print("-" * 88)
    for what, runs in rows:
        print(f"{what:<36} | {runs[0][0].ttft_s * 1000:>13.1f} {statistics.median(s.ttft_s for s, _ in runs) * 1000:>14.1f}"
              f" | {statistics.median(b for _, b in runs) * 1000:>17.1f}")
    print()


async def _wait_healthy(http, procs, path: str = "/health", timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a process exited during start-up; see its output above")
        try:
            async with http.get(path) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        await asyncio.sleep(1)
    raise TimeoutError(f"not ready: {path}")


# ---------------------------------------------------------------- tables


def print_table(engine: list[LevelResult], stack: list[LevelResult], names: tuple[str, str] = ("engine", "stack")
                ) -> None:
    a, b = names
    print()
    print(f"{'conc':>4} | {a + ' tok/s':>14} {b + ' tok/s':>14} {'ratio':>6} | "
          f"{a + ' TTFT ms':>14} {b + ' TTFT ms':>14} {'added ms':>8} | CPU ms per 1k tokens")
    print("-" * 110)
    for e, s in zip(engine, stack):
        cpu = "  ".join(f"{name} {s.cpu_ms_per_1k(name):.0f}" for name in s.cpu_s if s.cpu_s[name] > 0)
        print(f"{e.concurrency:>4} | {e.tokens_per_s:>14.1f} {s.tokens_per_s:>14.1f} "
              f"{s.tokens_per_s / e.tokens_per_s:>6.1%} | {e.ttft_median_ms:>14.1f} {s.ttft_median_ms:>14.1f} "
              f"{s.ttft_median_ms - e.ttft_median_ms:>8.1f} | {cpu}")
    print()


def print_scaling(by_workers: dict[int, list[LevelResult]]) -> None:
    base = by_workers[min(by_workers)]
    print()
    print(f"{'workers':>7} {'conc':>5} | {'tok/s':>9} {'x one':>6} | {'TTFT ms':>8}")
    print("-" * 46)
    for n, results in by_workers.items():
        for r, b in zip(results, base):
            print(f"{n:>7} {r.concurrency:>5} | {r.tokens_per_s:>9.1f} {r.tokens_per_s / b.tokens_per_s:>6.2f} | "
                  f"{r.ttft_median_ms:>8.1f}")
    print()


def _run(main: Awaitable):
    """uvloop where it imports, as the API and the worker run: on a small machine the load
    generator's own loop takes CPU from what is measured (and the engine measured in-process
    runs on the same loop, so the two ways stay comparable)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run_bench(args: argparse.Namespace) -> None:
    from common.settings import Settings

    settings = Settings()
    if args.model:
        settings.model = args.model
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    global REPEATS, VARY_LENGTH
    REPEATS = args.repeats
    VARY_LENGTH = args.vary_length

    def per_level(c: int) -> int:
        return args.requests_per_level or max(4, 2 * c)

    if args.during_batch:
        print(f"model {settings.model}: a streamed request idle and behind {args.during_batch} jobs of "
              f"{args.num_predict} tokens, median of 5")
        _run(bench_during_batch(settings, args.during_batch, args.num_predict))
        return
    spread = " (0.5x-1.5x, varied)" if VARY_LENGTH else ""
    header = (f"model {settings.model}, {args.num_predict} tokens per request{spread}, greedy, levels {levels}, "
              f"median of {REPEATS} runs per level")
    if args.peer:
        print(header + "; vLLama's /v1/completions, then vLLM's own server's")
        ours, theirs = _run(bench_peer(settings, levels, args.num_predict, per_level))
        print_table(theirs, ours, ("vLLM", "vLLama"))
        return
    if args.workers:
        counts = [int(x) for x in args.workers.split(",") if x.strip()]
        print(header + f"; the stack with {counts} workers")
        print_scaling({n: _run(bench_stack(settings, levels, args.num_predict, per_level, n)) for n in counts})
        return
    print(header)
    print("phase 1/2: engine in-process")
    engine = _run(bench_engine(settings, levels, args.num_predict, per_level))
    print("phase 2/2: through the stack (redis-server, vllama worker, vllama api)")
    stack = _run(bench_stack(settings, levels, args.num_predict, per_level))
    print_table(engine, stack)
