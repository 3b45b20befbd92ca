"""A prompt's prefix as the router compares it (api/routing.py): its text in blocks of
BLOCK_CHARS characters, each block's hash chained to the one before, so two prompts share a
block hash exactly when they share everything up to that block's end. The worker that ran a
prompt owns its blocks' hashes (``keys.prefix_owner``) for a while: its vLLM prefix cache
likely holds those tokens."""

from __future__ import annotations

import hashlib
import json

from common import keys
from common.protocol import GenerationJob

BLOCK_CHARS = 256
MAX_BLOCKS = 128  # prefixes up to 32K characters (about 8K tokens) are compared
AFFINITY_MIN_CHARS = 1024  # a shared prefix shorter than this saves too little prefill to follow
FIRST_COMPARED = AFFINITY_MIN_CHARS // BLOCK_CHARS - 1  # the first block whose hash is looked up
PREFIX_TTL_S = 600


def prefix_hashes(job: GenerationJob) -> list[str]:
    """The chained hashes of the job's prompt text, block by block (only whole blocks)."""
    text = prompt_text(job)
    hashes, chain = [], b""
    for start in range(0, min(len(text), MAX_BLOCKS * BLOCK_CHARS) - BLOCK_CHARS + 1, BLOCK_CHARS):
        chain = hashlib.blake2b(chain + text[start:start + BLOCK_CHARS].encode("utf-8", "surrogatepass"),
                                digest_size=8).digest()
        hashes.append(chain.hex())
    return hashes


def prompt_text(job: GenerationJob) -> str:
    """The job's prompt as text in the order the model reads it: what a template renders
    first (tools, the system prompt) first, each message after the ones before it."""
    if job.kind == "chat":
        head = json.dumps(job.tool_use.tools, sort_keys=True) if job.tool_use else ""
        parts = [head, *(f"\x1e{m.role}\x1f{m.content}\x1f{m.thinking}\x1f"
                         f"{json.dumps([c.model_dump() for c in m.tool_calls]) if m.tool_calls else ''}"
                         for m in job.messages)]
        return "".join(parts)
    if job.kind == "generate":
        context = ",".join(map(str, job.context))
        return job.prompt if job.raw else f"{job.template or ''}\x1e{job.system or ''}\x1e{context}\x1e{job.prompt}"
    return ""


def owned_prefix_keys(job: GenerationJob) -> list[str]:
    """The keys naming the owner of each of the job's prefixes long enough to route by."""
    return [keys.prefix_owner(job.model, h) for h in prefix_hashes(job)[FIRST_COMPARED:]]
