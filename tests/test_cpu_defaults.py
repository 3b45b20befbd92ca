"""The engine's dtype and OpenMP threads: chosen from the machine, overridden by the
environment, handed to vLLM.

bfloat16 on a CPU without native bfloat16 runs emulated and is several times slower than
float32 under load, and vLLM's own thread binding leaves a 2-core machine's model one core;
these tests pin the decisions and that they reach the engine.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.parts import load_settings
from common.settings import Settings
from workers import cpu_defaults, engine
from workers.cpu_defaults import choose_dtype, choose_threads, native_bf16, parse_cpu_flags, read_cpu_flags
from workers.main import build_engine

ROOT = Path(__file__).resolve().parent.parent

# Abbreviated /proc/cpuinfo texts of real machines.
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni
"""
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx f16c fma avx2 bmi2
"""
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sha2 crc32 atomics fphp asimdhp bf16 i8mm sve\n"
ARM_OLD = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"


def test_flags_are_read_from_the_flags_or_features_line():
    assert "avx512_bf16" in parse_cpu_flags(ZEN4)
    assert "model" not in parse_cpu_flags(ZEN4)  # the "model name" line is not a flags line
    assert parse_cpu_flags(ARM_BF16) >= {"bf16", "sve"}
    assert parse_cpu_flags("processor\t: 0\n") == frozenset()


def test_a_missing_cpuinfo_means_no_flags(tmp_path):
    assert read_cpu_flags(tmp_path / "absent") == frozenset()


@pytest.mark.parametrize(
    ("cpuinfo", "machine", "expected"),
    [(ZEN4, "x86_64", "bfloat16"), (SAPPHIRE_RAPIDS, "x86_64", "bfloat16"), (EPYC_AVX2, "x86_64", "float32"),
     (ARM_BF16, "aarch64", "bfloat16"), (ARM_OLD, "aarch64", "float32"),
     # "bf16" is an Arm flag name only; an x86 flag of that name would not mean AVX-512 BF16.
     ("flags : avx2 bf16\n", "x86_64", "float32"), ("", "x86_64", "float32")],
)
def test_auto_on_cpu_takes_bfloat16_only_where_the_cpu_computes_it_natively(cpuinfo, machine, expected):
    choice = choose_dtype("auto", cuda=False, flags=parse_cpu_flags(cpuinfo), machine=machine)
    assert choice.dtype == expected
    assert "VLLAMA_DTYPE" in choice.reason  # the log line says how to override it


def test_the_reason_names_the_flag_that_decided():
    assert native_bf16(parse_cpu_flags(SAPPHIRE_RAPIDS), "x86_64") == "amx_bf16"
    assert "avx512_bf16" in choose_dtype("auto", cuda=False, flags=parse_cpu_flags(ZEN4), machine="x86_64").reason
    assert "no native bfloat16" in choose_dtype("auto", cuda=False, flags=(), machine="x86_64").reason


def test_auto_on_cuda_leaves_vllms_own_choice():
    assert choose_dtype("auto", cuda=True, flags=parse_cpu_flags(EPYC_AVX2), machine="x86_64").dtype == "auto"


@pytest.mark.parametrize("setting", ["float32", "bfloat16", "float16"])
def test_a_set_dtype_wins_over_the_cpu(setting):
    for cpuinfo in (ZEN4, EPYC_AVX2):
        choice = choose_dtype(setting, cuda=False, flags=parse_cpu_flags(cpuinfo), machine="x86_64")
        assert (choice.dtype, choice.reason) == (setting, "set by VLLAMA_DTYPE")
    assert choose_dtype(setting, cuda=True, flags=(), machine="x86_64").dtype == setting


def test_the_setting_defaults_to_auto_and_is_normalised(monkeypatch):
    monkeypatch.delenv("VLLAMA_DTYPE", raising=False)
    assert Settings().dtype == "auto"
    monkeypatch.setenv("VLLAMA_DTYPE", " Float32 ")
    assert Settings().dtype == "float32"


@pytest.mark.parametrize("bad", ["int8", "fp8", "bf16", "float64"])
def test_a_bad_dtype_stops_at_start_naming_the_variable(monkeypatch, bad):
    monkeypatch.setenv("VLLAMA_DTYPE", bad)
    with pytest.raises(SystemExit) as stopped:
        load_settings()
    assert "VLLAMA_DTYPE" in str(stopped.value) and "float32" in str(stopped.value)


def test_a_worker_with_a_bad_dtype_exits_at_once_naming_the_variable(tmp_path):
    """Before it connects to Redis or loads anything: nothing listens at the Redis URL."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VLLAMA_HOME": str(tmp_path),
           "VLLAMA_DTYPE": "int8", "VLLAMA_REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-m", "cli", "worker"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "VLLAMA_DTYPE" in done.stderr and "int8" in done.stderr


@pytest.fixture
def recording_start(monkeypatch):
    """VllmEngine.start replaced by a recorder: no vLLM, no model needed."""
    calls: list[dict] = []

    def start(path, **kwargs):
        calls.append({"path": path, **kwargs, "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")})
        return "engine"

    monkeypatch.setattr(engine.VllmEngine, "start", staticmethod(start))
    monkeypatch.setattr(engine, "has_cuda", lambda: False)
    monkeypatch.setattr(cpu_defaults.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("VLLAMA_DTYPE", raising=False)
    # Set, then removed, so that monkeypatch puts back whatever the test's build_engine writes.
    for key in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    # A 2-core machine, one thread per core, whatever runs the tests.
    monkeypatch.setattr(cpu_defaults.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cpu_defaults, "_physical_cores", lambda cpus: {0: ("0", "0"), 1: ("0", "1")})
    return calls


@pytest.mark.parametrize(("cpuinfo", "expected"), [(ZEN4, "bfloat16"), (EPYC_AVX2, "float32")])
def test_the_worker_hands_the_chosen_dtype_to_the_engine(monkeypatch, caplog, recording_start, cpuinfo, expected):
    monkeypatch.setattr(cpu_defaults, "read_cpu_flags", lambda: parse_cpu_flags(cpuinfo))
    with caplog.at_level(logging.INFO, logger="workers.main"):
        assert build_engine(Settings(engine="vllm"), "smollm2:135m", Path("/models/x")) == "engine"
    assert [c["dtype"] for c in recording_start] == [expected]
    # One line says which dtype and why.
    [line] = [r.getMessage() for r in caplog.records if "dtype" in r.getMessage()]
    assert line.startswith(f"smollm2:135m: dtype {expected}: ")


def test_the_worker_hands_a_set_dtype_to_the_engine_whatever_the_cpu(monkeypatch, recording_start):
    monkeypatch.setattr(cpu_defaults, "read_cpu_flags", lambda: parse_cpu_flags(ZEN4))
    monkeypatch.setenv("VLLAMA_DTYPE", "float32")
    build_engine(Settings(engine="vllm"), "smollm2:135m", Path("/models/x"))
    assert recording_start[-1]["dtype"] == "float32"


def test_on_cuda_the_engine_gets_auto(monkeypatch, recording_start):
    monkeypatch.setattr(engine, "has_cuda", lambda: True)
    build_engine(Settings(engine="vllm"), "smollm2:135m", Path("/models/x"))
    assert recording_start[-1]["dtype"] == "auto"


SEPARATE_CORES = {0: ("0", "0"), 1: ("0", "1"), 2: ("0", "2"), 3: ("0", "3")}


def test_two_cores_both_run_the_model():
    choice = choose_threads({1, 0}, SEPARATE_CORES, {})
    assert choice is not None and choice.bind == "0,1"
    assert "VLLM_CPU_OMP_THREADS_BIND" in choice.reason  # the log line says how to override it


@pytest.mark.parametrize(
    ("cpus", "cores", "env"),
    [({0}, SEPARATE_CORES, {}),  # one CPU: vLLM already uses it
     ({0, 1, 2, 3}, SEPARATE_CORES, {}),  # more cores lose less to the reserved one; unmeasured
     ({0, 1}, {0: ("0", "0"), 1: ("0", "0")}, {}),  # two hyper-threads of one core; unmeasured
     ({0, 1}, SEPARATE_CORES, {"VLLM_CPU_OMP_THREADS_BIND": "0"}),  # the operator's binding wins
     ({0, 1}, SEPARATE_CORES, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"})],
)
def test_elsewhere_vllms_own_binding_stands(cpus, cores, env):
    assert choose_threads(cpus, cores, env) is None


def test_the_worker_gives_a_two_core_machines_engine_both_cores(caplog, recording_start):
    with caplog.at_level(logging.INFO, logger="workers.main"):
        build_engine(Settings(engine="vllm"), "smollm2:135m", Path("/models/x"))
    assert recording_start[-1]["bind"] == "0,1"  # set before vLLM starts its processes
    assert any(r.getMessage().startswith("smollm2:135m: OpenMP threads on CPUs 0,1: ") for r in caplog.records)


def test_the_operators_binding_reaches_the_engine_unchanged(monkeypatch, recording_start):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")
    build_engine(Settings(engine="vllm"), "smollm2:135m", Path("/models/x"))
    assert recording_start[-1]["bind"] == "1"


def test_on_cuda_the_threads_are_left_alone(monkeypatch, recording_start):
    monkeypatch.setattr(engine, "has_cuda", lambda: True)
    build_engine(Settings(engine="vllm"), "smollm2:135m", Path("/models/x"))
    assert recording_start[-1]["bind"] is None
