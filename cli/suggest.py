"""`vllama suggest`: which models of the alias table fit this machine's GPU(s).

The estimate is deliberately simple, from the table's download sizes: vLLM loads the published
bf16 weights as they are and needs room beside them for the KV cache and activations. GPUs are
found with ``nvidia-smi`` rather than torch, which would take seconds to import and initialise
CUDA in a command that only reads a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from common.models import ALIASES, MODELS, ModelSource, pull_hint

GIB = 1024**3
# Room beside the weights for the KV cache and activations: 20% of the weights, at least 1 GiB.
# Capped, because the KV cache a context needs grows with the context, not with the weights:
# 8 GiB holds some 25k tokens of a 70B model with grouped-query attention.
HEADROOM_FRACTION = 0.2
MIN_HEADROOM_BYTES = 1 * GIB
MAX_HEADROOM_BYTES = 8 * GIB
DEFAULT_UTILIZATION = 0.9  # vLLM's gpu_memory_utilization, as in VLLAMA_GPU_MEMORY_UTILIZATION
# On the CPU, generation speed falls with size; past about 2B parameters it is too slow to be
# worth suggesting, even where the weights fit in RAM.
CPU_PRACTICAL_BYTES = 4_000_000_000


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_bytes: int
    used_bytes: int

    @property
    def free_bytes(self) -> int:
        return max(self.total_bytes - self.used_bytes, 0)


def needed_bytes(source: ModelSource) -> int:
    """Memory a model needs to be served: its weights plus KV-cache/activation headroom."""
    weights = source.size_bytes or 0
    return weights + min(max(int(weights * HEADROOM_FRACTION), MIN_HEADROOM_BYTES), MAX_HEADROOM_BYTES)


def _library() -> list[tuple[str, ModelSource]]:
    """One entry per repo (the tagged name, not its :latest twin), largest first."""
    entries = [(name, source) for name, source in MODELS.items() if source.size_bytes]
    return sorted(entries, key=lambda e: (-(e[1].size_bytes or 0), e[0]))


def models_that_fit(
    memory_bytes: int, *, utilization: float = DEFAULT_UTILIZATION
) -> list[tuple[str, ModelSource, int]]:
    """(name, source, bytes needed) of the models whose weights and headroom fit in
    ``memory_bytes * utilization``, largest first, one per repo."""
    budget = memory_bytes * utilization
    return [(name, source, need) for name, source in _library() if (need := needed_bytes(source)) <= budget]


def find_gpus() -> list[Gpu]:
    """NVIDIA GPUs and their memory, from nvidia-smi; [] where there is none or it fails."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        try:  # memory reads "[N/A]" on some devices (MIG parents, unified memory)
            gpus.append(Gpu(int(fields[0]), fields[1], int(fields[2]) * 1024**2, int(fields[3]) * 1024**2))
        except ValueError:
            continue
    return gpus


def available_ram_bytes() -> int | None:
    """MemAvailable from /proc/meminfo: what the kernel can hand out without swapping."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _other_names(name: str, source: ModelSource) -> str:
    return ", ".join(n for n, s in ALIASES.items() if s is source and n != name)


def _table(rows: list[tuple[str, ModelSource, int]], fits: set[str] | None = None) -> list[str]:
    """Rows as aligned text; with ``fits`` (the --all listing) a FITS column."""
    header = ["NAME", "PARAMETERS", "SIZE (GB)", "NEEDS (GiB)", "GATED"]
    header += ["FITS", "ALSO"] if fits is not None else ["ALSO"]
    body = []
    for name, source, need in rows:
        row = [name, source.parameter_size or "?", f"{(source.size_bytes or 0) / 1e9:.1f}", f"{need / GIB:.1f}",
               "yes" if source.gated else "no"]
        if fits is not None:
            row.append("yes" if name in fits else "no")
        body.append(row + [_other_names(name, source)])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]


def _print_fitting(memory_bytes: int, utilization: float, show_all: bool, what: str) -> list[str]:
    """Print the fitting models (or all, marked); return the names of the fitting ones."""
    fitting = models_that_fit(memory_bytes, utilization=utilization)
    names = [name for name, _, _ in fitting]
    budget = memory_bytes * utilization / GIB
    if show_all:
        print(f"All models, and whether they fit in {budget:.1f} GiB ({what}):")
        print("\n".join(_table([(n, s, needed_bytes(s)) for n, s in _library()], set(names))))
    elif fitting:
        print(f"Models that fit in {budget:.1f} GiB ({what}), largest first:")
        print("\n".join(_table(fitting)))
    else:
        print(f"No model of the table fits in {budget:.1f} GiB ({what}).")
    return names


def _print_hints(fitting: list[str]) -> None:
    """How to pull a model (the largest that fits, as the example), and what gated ones need."""
    name = fitting[0] if fitting else "smollm2:135m"
    print()
    print(f"Pull one with `{pull_hint(name)}`, or "
          f"""`curl http://127.0.0.1:11434/api/pull -d '{{"model": "{name}"}}'`.""")
    print("Gated models (GATED yes: Meta's Llama, Google's Gemma, Mistral's) need HF_TOKEN set for the "
          "server, from a Hugging Face account that accepted the model's license.")
    print("NEEDS counts the weights plus 20% (1 to 8 GiB) for the KV cache; a long-context model "
          "may need VLLAMA_MAX_MODEL_LEN lowered (for example 8192) to start with little memory left.")


def _gpu_utilization(gpu: Gpu, utilization: float) -> float:
    """vLLM takes its share of total memory and refuses to start if that much is not free."""
    return min(utilization, gpu.free_bytes / gpu.total_bytes) if gpu.total_bytes else 0.0


def _fraction(value: str) -> float:
    """A share of memory, as vLLM's gpu_memory_utilization takes it: above 0, at most 1."""
    share = float(value)
    if not 0 < share <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return share


def _positive(value: str) -> float:
    size = float(value)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive size")
    return size


def run(args: argparse.Namespace) -> None:
    """Print the models that fit the GPU(s) found, or a given memory size; exits 0 either way."""
    utilization = args.utilization
    if utilization is None:
        try:
            utilization = _fraction(os.environ.get("VLLAMA_GPU_MEMORY_UTILIZATION", str(DEFAULT_UTILIZATION)))
        except (ValueError, argparse.ArgumentTypeError):
            utilization = DEFAULT_UTILIZATION
    if args.memory_gib is not None:
        names = _print_fitting(int(args.memory_gib * GIB), utilization, args.all,
                               f"{utilization:.0%} of {args.memory_gib:g} GiB")
        _print_hints(names)
    elif gpus := find_gpus():
        _suggest_for_gpus(gpus, utilization, args.all)
    else:
        _suggest_for_cpu(args.all)


def _suggest_for_gpus(gpus: list[Gpu], utilization: float, show_all: bool) -> None:
    for gpu in gpus:
        print(f"GPU {gpu.index}: {gpu.name}, {gpu.total_bytes / GIB:.1f} GiB, {gpu.free_bytes / GIB:.1f} GiB free")
    best = max(gpus, key=lambda g: g.total_bytes * _gpu_utilization(g, utilization))
    best_util = _gpu_utilization(best, utilization)
    what = f"{best_util:.0%} of GPU {best.index}" + (", as much as is free" if best_util < utilization else "")
    print()
    names = _print_fitting(best.total_bytes, best_util, show_all, what)

    tp = 1 << (len(gpus).bit_length() - 1)  # tensor parallelism wants a power of two
    if tp > 1:
        per_gpu = min(g.total_bytes * _gpu_utilization(g, utilization) for g in gpus)
        more = [row for row in models_that_fit(int(per_gpu * tp), utilization=1.0) if row[0] not in names]
        print()
        if more:
            print(f"With tensor parallelism over {tp} GPUs ({tp * per_gpu / GIB:.1f} GiB), also these "
                  f"(set VLLAMA_TENSOR_PARALLEL_SIZE={tp}):")
            print("\n".join(_table(more)))
            names += [name for name, _, _ in more]
        else:
            print(f"Tensor parallelism over {tp} GPUs (VLLAMA_TENSOR_PARALLEL_SIZE={tp}) adds no larger model.")
    _print_hints(names)


def _suggest_for_cpu(show_all: bool) -> None:
    print("No NVIDIA GPU was found (nvidia-smi is missing or reports none): vLLama runs on the CPU.")
    ram = available_ram_bytes()
    if ram is None:
        print("Small models suit the CPU best, for example smollm2:135m (bundled) or qwen2.5:0.5b.")
        return
    if show_all:
        _print_hints(_print_fitting(ram, DEFAULT_UTILIZATION, True, f"{DEFAULT_UTILIZATION:.0%} of the RAM free"))
        return
    small = [row for row in models_that_fit(ram) if (row[1].size_bytes or 0) <= CPU_PRACTICAL_BYTES]
    if small:
        print(f"Small models are the practical ones on the CPU; these fit in the {ram / GIB:.1f} GiB of "
              "RAM available:")
        print("\n".join(_table(small)))
    else:
        print(f"No model of the table fits in the {ram / GIB:.1f} GiB of RAM available.")
    print("To plan for a GPU: vllama suggest --memory-gib N")
    _print_hints([name for name, _, _ in small])


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `suggest` on the `vllama` command's subparsers."""
    p = subparsers.add_parser("suggest", help="which models fit this machine's GPU(s)")
    p.add_argument("--memory-gib", type=_positive, metavar="N",
                   help="plan for N GiB of GPU memory instead of looking for a GPU")
    p.add_argument("--all", action="store_true", help="list every model, with a FITS column")
    p.add_argument("--utilization", type=_fraction, default=None, metavar="F",
                   help="share of GPU memory vLLM may use (default: VLLAMA_GPU_MEMORY_UTILIZATION or 0.9)")
    p.set_defaults(func=run)
    return p
