"""Pure functions: names, settings, option conversion, NDJSON framing, the JSON serializer."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from api import ndjson
from api.ollama_models import ChatRequest, GenerateRequest, Options
from common.errors import BadRequest
from common.models import canonical_name
from common.redis_conn import job_deserializer, job_serializer
from common.settings import Settings, parse_ollama_host


@pytest.mark.parametrize(
    ("given", "expected"),
    [("smollm2:135m", "smollm2:135m"), ("smollm2", "smollm2:latest"), ("  llama3.1:8b ", "llama3.1:8b"),
     ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"), ("org/name:tag", "org/name:tag")],
)
def test_canonical_names(given, expected):
    assert canonical_name(given) == expected


@pytest.mark.parametrize("bad", ["", " ", "../x", "a/../b", "a b", "/abs", "a/b/c", "a:b:c", "x\\y"])
def test_names_that_could_reach_the_filesystem_are_refused(bad):
    with pytest.raises(BadRequest):
        canonical_name(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0.0.0.0", ("0.0.0.0", 11434)), ("0.0.0.0:8080", ("0.0.0.0", 8080)), (":9000", ("127.0.0.1", 9000)),
     ("http://10.1.2.3:1234/", ("10.1.2.3", 1234)), ("[::1]:5000", ("::1", 5000))],
)
def test_ollama_host_is_parsed_like_ollama(value, expected):
    assert parse_ollama_host(value) == expected


def test_ollama_host_sets_the_bind_address_unless_vllama_says_otherwise(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0:12345")
    s = Settings()
    assert (s.host, s.port) == ("0.0.0.0", 12345)
    monkeypatch.setenv("VLLAMA_PORT", "7777")
    s = Settings()
    assert (s.host, s.port) == ("127.0.0.1", 7777)


def test_default_bind_is_ollamas(monkeypatch):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    s = Settings()
    assert (s.host, s.port) == ("127.0.0.1", 11434)


def test_options_map_to_sampling_with_ollama_defaults():
    s = Options().to_sampling(None)
    assert (s.temperature, s.top_k, s.top_p, s.max_tokens, s.seed) == (0.8, 40, 0.9, None, None)
    s = Options(temperature=0, top_k=5, top_p=0.5, min_p=0.1, num_predict=7, stop="END", seed=3,
                repeat_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5, num_ctx=512).to_sampling("json")
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.max_tokens, s.stop, s.seed) == (0, 5, 0.5, 0.1, 7, ["END"], 3)
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty, s.num_ctx) == (1.1, 0.5, -0.5, 512)
    assert s.json_object and s.json_schema is None
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert Options().to_sampling(schema).json_schema == schema
    assert Options(num_predict=-1).to_sampling(None).max_tokens is None
    assert Options(seed=-1).to_sampling(None).seed is None


@pytest.mark.parametrize(
    "options",
    [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 2}, {"top_k": -1}, {"num_predict": -3},
     {"repeat_penalty": 0}, {"presence_penalty": 3}, {"num_ctx": 0}],
)
def test_out_of_range_options_are_refused(options):
    with pytest.raises(BadRequest):
        Options(**options).to_sampling(None)


def test_unknown_options_and_fields_are_ignored():
    req = GenerateRequest.model_validate({"model": "m", "prompt": "p", "whatever": 1,
                                          "options": {"numa": True, "mirostat": 2, "temperature": 0.1}})
    assert req.to_job().sampling.temperature == 0.1


def test_chat_roles_are_lowercased_and_checked():
    req = ChatRequest.model_validate({"model": "m", "messages": [{"role": "USER", "content": "x"}]})
    assert req.to_job().messages[0].role == "user"
    with pytest.raises(ValueError):
        ChatRequest.model_validate({"model": "m", "messages": [{"role": "robot", "content": "x"}]})


def test_requests_the_api_can_judge_are_refused_and_the_rest_go_to_the_worker():
    for body in ({"images": ["aGk="]}, {"template": "{{ .Prompt "}, {"template": "{{ call .Prompt }}"}):
        with pytest.raises(BadRequest):
            GenerateRequest.model_validate({"model": "m", "prompt": "p", **body}).to_job()
    # Whether the model can fill in the middle, only its worker knows (its vocabulary).
    assert GenerateRequest.model_validate({"model": "m", "prompt": "p", "suffix": "end"}).to_job().suffix == "end"


def test_think_takes_ollamas_values_and_refuses_others():
    for sent, meant in ((True, True), (False, False), ("high", "high"), ("max", "max"), ("false", False), (None, None),
                        ("", None)):
        job = GenerateRequest.model_validate({"model": "m", "prompt": "p", "think": sent}).to_job()
        assert job.think == meant
    for bad in ("extreme", 1, ["low"]):
        with pytest.raises(ValueError, match="think"):
            ChatRequest.model_validate({"model": "m", "messages": [], "think": bad})


def test_ndjson_lines_never_split_inside_an_object():
    text = "a\u2028b\u2029c\u0085d\ne"
    line = ndjson.line({"response": text})
    assert line.endswith(b"\n") and len(line.decode().splitlines()) == 1
    assert json.loads(line)["response"] == text


def test_token_lines_are_the_chunks_ollama_streams_byte_for_byte(monkeypatch):
    monkeypatch.setattr(ndjson, "now_rfc3339", lambda: "2026-01-02T03:04:05.000006Z")
    for text in ("hello ", "", 'quo"te \\ é 😀', "a\u2028b\u2029c\u0085d\ne"):
        assert ndjson.TokenLines("smollm2:135m", "generate")(text) == \
            ndjson.line(ndjson.generate_chunk("smollm2:135m", text))
        assert ndjson.TokenLines("smollm2:135m", "chat")(text) == ndjson.line(ndjson.chat_chunk("smollm2:135m", text))
        assert len(ndjson.TokenLines("m", "chat")(text).decode().splitlines()) == 1


def test_arq_payloads_are_json_even_for_exceptions():
    data = job_serializer({"r": ValueError("boom"), "a": [1]})
    assert job_deserializer(data) == {"r": {"error_type": "ValueError", "error": "boom"}, "a": [1]}


# common/ is what every part shares; if it reached into a part (or the CLI that wires them),
# importing it would drag that part's dependencies into every process, and cycles follow.
LAYERED_OUT_OF_COMMON = frozenset({"api", "workers", "cli"})


def _imports_of_parts(source: str) -> list[str]:
    """Modules of api/, workers/ or cli/ that ``source`` imports, at any depth (a function's
    local import counts too: it runs the same import)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [n for n in names if n.split(".")[0] in LAYERED_OUT_OF_COMMON]
    return found


def test_the_import_check_sees_every_form_of_import():
    source = "import api.app\nfrom workers import main\ndef f():\n    from cli.main import main\nimport json\n"
    assert _imports_of_parts(source) == ["api.app", "workers", "cli.main"]


def test_common_imports_neither_api_nor_workers_nor_the_cli():
    root = Path(__file__).resolve().parent.parent / "common"
    modules = sorted(root.rglob("*.py"))
    assert len(modules) > 10
    offenders = {str(m.relative_to(root.parent)): found for m in modules
                 if (found := _imports_of_parts(m.read_text(encoding="utf-8")))}
    assert not offenders, f"common/ must not import api, workers or cli: {offenders}"
