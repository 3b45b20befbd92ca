"""Engine tokens/s and median time to first token for each dtype, on this machine.

Which number format is fastest depends on the CPU (native bfloat16 or not), so the default
VLLAMA_DTYPE=auto chooses from its flags; this script checks that choice against the figures.
It runs only `vllama bench`'s in-process engine phase (the same build_engine the worker uses),
one dtype after the other, and prints one table:

    .venv/bin/python scripts/bench_dtype.py --dtypes bfloat16,float32 --concurrency 1,8,32

Each engine load takes about 30 s and each level runs at full load on every core: run
nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated VLLAMA_DTYPE values")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    parser.add_argument("--num-predict", type=int, default=64)
    parser.add_argument("--requests-per-level", type=int, default=0, help="0 = 2x the concurrency (min 4)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per level; the median is reported")
    parser.add_argument("--model")
    args = parser.parse_args()

    import cli.bench as bench
    from cli.parts import load_settings
    from workers.cpu_defaults import engine_dtype, engine_threads
    from workers.engine import has_cuda

    bench.REPEATS = args.repeats
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]

    def per_level(c: int) -> int:
        return args.requests_per_level or max(4, 2 * c)

    cuda = has_cuda()
    threads = engine_threads(cuda=cuda)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs; VLLAMA_DTYPE=auto picks {engine_dtype('auto', cuda=cuda)}; "
          f"{threads or 'OpenMP threads: ' + os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'as vLLM binds them')}")
    results = {}
    for dtype in dtypes:
        os.environ["VLLAMA_DTYPE"] = dtype  # validated as the worker would read it
        settings = load_settings(model=args.model)
        print(f"{dtype}: model {settings.model}, {args.num_predict} tokens per request, levels {levels}, "
              f"median of {args.repeats}", flush=True)
        results[dtype] = asyncio.run(bench.bench_engine(settings, levels, args.num_predict, per_level))

    print()
    print(f"{'dtype':>9} | " + " | ".join(f"{c:>3} streams: tok/s  TTFT ms" for c in levels))
    for dtype, rows in results.items():
        print(f"{dtype:>9} | " + " | ".join(f"{r.tokens_per_s:>18.1f} {r.ttft_median_ms:>8.0f}" for r in rows))


if __name__ == "__main__":  # vLLM spawns its engine process, which imports this module again
    main()
