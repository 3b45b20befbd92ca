"""Typed configuration, read once from the environment (prefix ``VLLAMA_``).

``OLLAMA_HOST`` is honoured for the bind address, as Ollama does, so an existing
``OLLAMA_HOST=0.0.0.0:11434`` keeps working.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORT = 11434
DEFAULT_STORE_PORT = 11435  # a pull worker's file server (models fetched by other machines)
# VLLAMA_DTYPE: "auto" (workers/cpu_defaults.py decides) or one of vLLM's own names for a dtype.
ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16", "float", "half")


def _default_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllama"


def parse_ollama_host(value: str) -> tuple[str, int]:
    """Parse OLLAMA_HOST the way Ollama does: ``host``, ``host:port``, ``:port``,
    ``http://host:port``; a missing port means 11434."""
    value = value.strip()
    for scheme in ("http://", "https://"):
        if value.startswith(scheme):
            value = value[len(scheme):]
    value = value.rstrip("/")
    if value.startswith("["):  # [::1]:11434
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":") or str(DEFAULT_PORT)
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, str(DEFAULT_PORT)
    if not port.isdigit():
        raise ValueError(f"OLLAMA_HOST={value!r}: port must be a number")
    return host or "127.0.0.1", int(port)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VLLAMA_", extra="ignore")

    # --- where things are ---
    redis_url: str | None = Field(
        default=None,
        description="Shared Redis, e.g. redis://host:6379/0. Unset: `vllama serve` starts a private one.",
    )
    home: Path = Field(default_factory=_default_home, description="Model cache and embedded Redis data.")
    redis_appendfsync: Literal["everysec", "always", "no"] = Field(
        default="everysec",
        description="How `vllama serve`'s private Redis flushes its append-only file (VLLAMA_HOME/redis) to "
                    "disk: everysec (a crash of the machine loses up to about a second of writes), always "
                    "(nothing acknowledged is lost; a disk flush per write), no (when the kernel decides).",
    )
    redis_maxmemory: str = Field(
        default="4gb",
        description="Most memory `vllama serve`'s private Redis may use for its data (Redis's units: 4gb, 512mb; "
                    "0: no limit). Beyond it nothing is evicted: requests that would write get 507 until files, "
                    "batches or job records are deleted or expire.",
    )
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT

    # --- API ---
    api_workers: int = Field(
        default=1, ge=1,
        description="API processes sharing the listening port (`vllama api --workers N`, `vllama serve`), for "
                    "machines where one process's core limits requests per second; each is a full replica.",
    )
    max_queue: int = Field(
        default=512, ge=1,
        description="Jobs waiting for a worker, per model, beyond which requests get 503 (Ollama's OLLAMA_MAX_QUEUE).",
    )
    max_batch_queue: int = Field(
        default=100_000, ge=1,
        description="Async (batch-class) jobs waiting per model, beyond which submissions get 503.",
    )
    keep_result_s: int = Field(default=3600, ge=1, description="How long job records and results stay in Redis.")
    file_ttl_s: int = Field(
        default=30 * 24 * 3600, ge=60,
        description="How long uploaded files, batches and their output files stay in Redis (OpenAI keeps 30 days).",
    )
    strict_tools: bool = Field(
        default=False,
        description="Answer requests with tools for a model that cannot take them 400 'does not support tools' "
                    "(Ollama's way) instead of serving them without the tools.",
    )
    api_key: str = Field(
        default="", description="When set, every endpoint but / and /health needs `Authorization: Bearer <key>`.",
    )

    api_keys: Path | None = Field(
        default=None,
        description="A file of API keys, one `name sha256-of-key [admin]` per line: each client's jobs, files "
                    "and batches are its own; an admin key sees all. Combines with VLLAMA_API_KEY (an admin key).",
    )
    origins: str = Field(
        default="",
        description="Browser origins allowed beyond Ollama's defaults (localhost, 127.0.0.1, 0.0.0.0 on any port, "
                    "app schemes), comma-separated; `*` allows all. OLLAMA_ORIGINS is read too.",
    )

    # --- limits on what one request may ask for ---
    max_request_bytes: int = Field(
        default=32 * 2**20, ge=1024,
        description="Largest request body, in bytes (file uploads have their own limit); larger: 413.",
    )
    max_upload_bytes: int = Field(
        default=200 * 2**20, ge=1024, description="Largest uploaded file (/v1/files), in bytes; larger: 413.",
    )
    max_file_storage_bytes: int = Field(
        default=2 * 2**30, ge=1024,
        description="Total bytes of uploaded and batch output files kept in Redis; an upload past it gets 413.",
    )
    max_prompt_bytes: int = Field(
        default=8 * 2**20, ge=1024,
        description="Largest prompt text (all messages together), in bytes, checked before tokenizing; larger: 413.",
    )
    max_messages: int = Field(default=4096, ge=1, description="Most messages in one chat request; more: 413.")
    max_image_bytes: int = Field(
        default=20 * 2**20, ge=1024,
        description="Largest total size of the images of one request (decoded), in bytes; larger: 413.",
    )
    max_images: int = Field(default=16, ge=1, description="Most images in one request; more: 413.")
    fetch_images: bool = Field(
        default=False,
        description="Fetch the http(s) image_url of OpenAI requests (the server then reaches any address a "
                    "client names); off: only inline data: URLs are taken.",
    )
    max_n: int = Field(default=16, ge=1, description="Largest `n` (choices per OpenAI request); larger: 413.")

    auto_pull: Literal["off", "aliases", "any"] = Field(
        default="off",
        description="Pull a model that no store has when a request names it: off; aliases (only names in the "
                    "alias table; what `vllama serve` uses); any (any Hugging Face repository).",
    )
    queue_timeout_s: float = Field(
        default=600, gt=0,
        description="Longest a request waits in its queue for a worker to start it; then 503 saying so.",
    )
    load_timeout_s: float = Field(
        default=600, gt=0, description="Longest a request waits for its model to be loaded (Ollama's OLLAMA_LOAD_TIMEOUT).",
    )

    # --- worker ---
    model: str = Field(
        default="smollm2:135m",
        description="Model a generation worker loads at start and keeps loaded; empty: none, load on demand.",
    )
    models: str = Field(
        default="*", description="Models a worker may load on demand: comma-separated names or patterns (qwen2.5:*).",
    )
    max_loaded_models: int = Field(
        default=1, ge=1, description="Generation models one worker holds at once, and as many embedding models besides; "
        "loading another unloads an idle one of its kind.",
    )
    keep_alive: str = Field(
        default="5m", description="How long a model loaded on demand stays loaded when idle (Ollama's OLLAMA_KEEP_ALIVE).",
    )
    store_id: str = Field(
        default="", description="Name of this machine's model store; empty: the host name. Machines sharing one "
                                "model directory (a network disk) should share the name.",
    )
    store_port: int = Field(
        default=DEFAULT_STORE_PORT, ge=0, le=65535,
        description="Port on which a pull worker serves its store's files to other machines' stores; 0: any "
                    "free port. The default, when taken, falls back to a free one (the URL is advertised in Redis).",
    )
    store_bind: str = Field(
        default="", description="Address the store's file server listens on; empty: the advertised address when "
                                "that is found automatically, else all interfaces (0.0.0.0).",
    )
    store_advertise: str = Field(
        default="", description="host or host:port other machines reach this store's file server at; empty: the "
                                "local address of the pull worker's connection to Redis, and the bound port.",
    )
    max_jobs: int = Field(default=0, ge=0, description="Jobs one worker runs at once; 0 = the engine's max_num_seqs.")
    batch_share: float = Field(
        default=0.75, gt=0, le=1,
        description="The share of a worker's job slots that batch-class jobs (async jobs, Batch API lines) may "
                    "fill; the rest stay free for interactive requests.",
    )
    max_num_seqs: int = Field(default=0, ge=0, description="vLLM max_num_seqs; 0 = 64 on CPU, 256 on GPU.")
    max_model_len: int = Field(default=0, ge=0, description="vLLM max_model_len; 0 = the model's own.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool | None = Field(default=None, description="Unset: eager on CPU (fast start), graphs on GPU.")
    kv_cache_gib: int = Field(default=2, ge=1, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).")
    dtype: str = Field(
        default="auto",
        description="The engine's number format: auto (on a GPU vLLM's own choice; on a CPU bfloat16 where it "
                    "computes bfloat16 natively, avx512_bf16 or amx_bf16 on x86, bf16 on Arm, else float32), "
                    "float32, bfloat16 or float16.",
    )
    engine: str = Field(default="vllm", description="'vllm', or 'fake' for plumbing tests and benchmarks.")
    job_timeout_s: int = Field(default=3600, ge=1, description="Longest a single generation may run.")
    poll_delay_s: float = Field(
        default=1.0, gt=0,
        description="How often a worker looks for jobs and aborts unasked. Enqueues and aborts wake workers at "
                    "once; this is the fallback for wake-ups lost while Redis reconnects.",
    )
    route: bool = Field(
        default=True,
        description="Route each job to a worker by load and prompt prefix (api/routing.py); off: whichever worker "
                    "looks first takes as many queued jobs as it has room for.",
    )
    route_affinity: bool = Field(
        default=True,
        description="Send a prompt that begins as one run recently to the worker that ran it, whose prefix cache "
                    "holds it (unless it is much busier); off: balance by load alone.",
    )
    route_hold_s: float = Field(
        default=2.0, gt=0,
        description="How long only the worker a job is routed to may take it; then any worker may (a worker that "
                    "died or stalls strands nothing).",
    )
    job_log: bool = Field(default=False, description="Log each job's start and end in the worker (arq's lines); "
                          "off by default: at hundreds of jobs a second they cost a share of the worker's CPU.")
    access_log: bool = Field(default=True, description="Log a line per HTTP request in the API, as Ollama does; "
                             "off saves the API a share of its CPU per request under heavy load.")

    # --- liveness ---
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    heartbeat_ttl_s: float = Field(default=5.0, gt=0, description="A worker silent this long is dead.")

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, v: str) -> str:
        from common.durations import parse_keep_alive

        parse_keep_alive(v)  # fail at start, naming the variable, not at the first request
        return v

    @field_validator("auto_pull", mode="before")
    @classmethod
    def _auto_pull(cls, v: object) -> object:
        # Earlier versions took a boolean: on meant what "aliases" means now.
        if isinstance(v, bool) or str(v).lower() in ("1", "0", "true", "false", "yes", "no", "on", ""):
            return "aliases" if str(v).lower() in ("1", "true", "yes", "on") else "off"
        return str(v).lower()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _no_key_file(cls, v: object) -> object:
        return None if v == "" else v  # VLLAMA_API_KEYS= (empty) means no file, not the current directory

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        from common.api_keys import load_keys

        load_keys(v, info.data.get("api_key", ""))  # a bad line stops the server at start, naming the line
        return v

    @field_validator("redis_maxmemory")
    @classmethod
    def _redis_size(cls, v: str) -> str:
        if not re.fullmatch(r"\d+(?:b|k|kb|m|mb|g|gb)?", v.strip().lower()):
            raise ValueError(f"{v!r} is not a size: write a number with kb, mb or gb (4gb, 512mb), or 0 for no limit")
        return v.strip().lower()

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in ENGINE_DTYPES:
            raise ValueError(f"{v!r} is not a dtype the engine takes: write auto, float32, bfloat16 or float16")
        return v

    @field_validator("redis_url")
    @classmethod
    def _empty_is_unset(cls, v: str | None) -> str | None:
        return v or None

    def model_post_init(self, __context: object) -> None:
        ollama_host = os.environ.get("OLLAMA_HOST")
        if ollama_host and "VLLAMA_HOST" not in os.environ and "VLLAMA_PORT" not in os.environ:
            self.host, self.port = parse_ollama_host(ollama_host)

    @property
    def model_cache(self) -> Path:
        return self.home / "models"


@lru_cache
def get_settings() -> Settings:
    return Settings()
