"""Every Redis key and pub/sub channel vLLama uses, in one place.

All of ours live under ``vllama:``; arq keeps its own ``arq:`` keys (job payloads, results,
in-progress markers, the abort set). Each key we write has a TTL, or a comment here saying
why it has none.
"""

from __future__ import annotations

PREFIX = "vllama"


def generation_queue(model: str) -> str:
    """arq queue (zset) of generation jobs for one model; one queue per canonical model name,
    so every worker serving that model takes from it. No TTL: arq owns the zset and removes
    each member when its job ends."""
    return f"{PREFIX}:queue:{model}"


def frames_channel(job_id: str) -> str:
    """Pub/sub channel carrying one job's frames (nothing is stored)."""
    return f"{PREFIX}:frames:{job_id}"


def job_record(job_id: str) -> str:
    """JSON record of one job's state (who runs it, status, error); TTL = settings.keep_result_s."""
    return f"{PREFIX}:job:{job_id}"


def worker_record(worker_id: str) -> str:
    """JSON heartbeat of one live worker; TTL = settings.heartbeat_ttl_s, refreshed every beat,
    so the key vanishes within the TTL of a worker dying."""
    return f"{PREFIX}:worker:{worker_id}"


# Zset of worker ids scored by last heartbeat (ms). No TTL: it is shared by all workers;
# readers drop members whose score is older than the heartbeat TTL, so it never grows
# beyond the workers seen in the last few seconds.
WORKERS = f"{PREFIX}:workers"

