"""Every Redis key and pub/sub channel vLLama uses, in one place.

All of ours live under ``vllama:``; arq keeps its own ``arq:`` keys (job payloads, results,
in-progress markers, the abort set). Each key we write has a TTL, or a comment here saying
why it has none and what keeps it bounded (a pruning rule: api/pruning.py applies those that
nobody applies in passing). arq's keys: the payload lives until its job is taken (24 h at
most), the in-progress marker while it runs, the result VLLAMA_KEEP_RESULT_S for async jobs
and batch lines and not at all for streamed jobs (common/job_queue.py keep_no_result), and
the abort set is pruned of requests older than a minute.
"""

from __future__ import annotations

PREFIX = "vllama"


def generation_queue(model: str) -> str:
    """arq queue (zset) of generation jobs for one model; one queue per canonical model name,
    so every worker serving that model takes from it. No TTL: arq owns the zset and removes
    each member when its job ends."""
    return f"{PREFIX}:queue:{model}"


def batch_queue(model: str) -> str:
    """arq queue (zset) of one model's batch-class jobs (async jobs, Batch API lines). Workers
    take from it with fewer slots than from the interactive queue, and vLLM schedules its
    requests at a lower priority, so a new chat never waits behind a long batch. No TTL: arq
    owns it."""
    return f"{PREFIX}:batch-queue:{model}"


def queue_for(model: str, priority: str) -> str:
    return batch_queue(model) if priority == "batch" else generation_queue(model)


# Pub/sub channel that wakes the workers (workers/wakeup.py), so they take a job or honour an
# abort at once instead of on their next poll. Messages: "<score ms> <queue>" when jobs were
# queued (the score: when the newest of them becomes takeable, by cluster time), and
# "abort <job id>" when a running job is to be aborted. Nothing is stored.
WAKEUP = f"{PREFIX}:wakeup"


def frames_channel(job_id: str) -> str:
    """Pub/sub channel carrying one job's frames (nothing is stored)."""
    return f"{PREFIX}:frames:{job_id}"


def reply_channel(api_id: str) -> str:
    """Pub/sub channel of one API process: the frames of every streamed job it serves, a
    bundle per worker and engine step (workers/frames.py; nothing is stored)."""
    return f"{PREFIX}:replies:{api_id}"


def job_record(job_id: str) -> str:
    """JSON record of one job's state (who runs it, status, error); TTL = settings.keep_result_s
    while the job waits or runs and for async jobs; a streamed job's, once it ended, lives
    common/job_queue.py's ENDED_STREAM_RECORD_S (a minute): its client has the answer."""
    return f"{PREFIX}:job:{job_id}"


def response(response_id: str) -> str:
    """JSON of one stored Responses API response (api/responses_routes.StoredResponse): the
    response object, its input and output as chat messages, the id it continued, its owner.
    TTL = settings.keep_result_s from when it was answered."""
    return f"{PREFIX}:response:{response_id}"


def job_frames(job_id: str) -> str:
    """List of an async job's frames (JSON, in order), kept so the jobs API can show partial
    output and let a client attach to the stream at any point. TTL = settings.keep_result_s,
    renewed with every frame."""
    return f"{PREFIX}:job-frames:{job_id}"


# Hash: job id -> id of the worker that took it, for every job taken and not ended. Written
# by the worker's job consumer as it claims a job and removed as it ends it; the API's sweep
# fails the jobs of workers whose heartbeat lapsed (started or not) and removes them. No TTL:
# shared, and bounded by the jobs running now.
RUNNING = f"{PREFIX}:running"

def api_http_counts(group: str) -> str:
    """Hash: API process id -> its HTTP request counts (JSON), for the processes of one
    `vllama api --workers N` (api/replica_counts.py). TTL: 10 minutes, renewed by every write
    (each process writes every 2 s)."""
    return f"{PREFIX}:api-http-counts:{group}"


# Lock held by the API replica sweeping RUNNING this round; TTL: one round (a few seconds).
SWEEP_LOCK = f"{PREFIX}:sweep-lock"

# Zset of async job ids scored by submission time (ms), for listing recent jobs. No TTL: it
# is shared; the API drops members older than settings.keep_result_s whenever it adds one,
# and its housekeeping every round.
JOBS = f"{PREFIX}:jobs"

# Hashes: API key name -> prompt tokens / generated tokens of the jobs made with that key,
# added by the worker that ends each job (with its end record), shown in /metrics. No TTL:
# they are counters (Prometheus takes a reset for a restart); one field per key name, so they
# are bounded by the keys file (VLLAMA_API_KEYS).
KEY_PROMPT_TOKENS = f"{PREFIX}:key-prompt-tokens"
KEY_GENERATED_TOKENS = f"{PREFIX}:key-generated-tokens"


def worker_record(worker_id: str) -> str:
    """JSON heartbeat of one live worker; TTL = settings.heartbeat_ttl_s, refreshed every beat,
    so the key vanishes within the TTL of a worker dying."""
    return f"{PREFIX}:worker:{worker_id}"


# Zset of worker ids (scored by the worker's last beat, for redis-cli readers only). No TTL:
# it is shared by all workers; it is an index, and liveness is the record key's TTL: readers
# drop members whose record has expired (the API's housekeeping too, every round), so it
# never grows beyond the workers now alive.
WORKERS = f"{PREFIX}:workers"



# ---------------------------------------------------------------- models: stores, pulls, loads


def store_queue(store_id: str) -> str:
    """arq queue (zset) of one model store's jobs: pull, delete, copy. A store is a model
    cache directory (usually one per machine) served by its pull workers. No TTL: arq owns
    it. Not under ``queue:`` so that no model name can collide with it."""
    return f"{PREFIX}:store-queue:{store_id}"


def store_record(store_id: str) -> str:
    """JSON heartbeat of one live store (host, free disk); TTL = settings.heartbeat_ttl_s."""
    return f"{PREFIX}:store:{store_id}"


# Zset of store ids, an index like WORKERS and pruned the same way.
STORES = f"{PREFIX}:stores"


def catalog(store_id: str) -> str:
    """Hash: model name -> JSON manifest, the models on one store's disk. It mirrors a disk,
    not a moment: the store rewrites it whole when it starts and edits it on every pull,
    delete and copy, and readers ignore the catalogs of stores that are not alive. TTL =
    common/catalog.py's CATALOG_TTL_S (a day), set again by every heartbeat of the store, so
    the catalog of a store gone for a day expires."""
    return f"{PREFIX}:catalog:{store_id}"


def disk_reservations(store_id: str) -> str:
    """Hash: pull -> "<bytes> <expiry ms>", the disk space held by the pulls under way into one
    store (workers/disk_space.py). Lapsed entries are dropped by the next reservation; the key's
    TTL (a minute, renewed by every pull's heartbeat) ends it when no pull is left."""
    return f"{PREFIX}:disk:{store_id}"


def blobs(store_id: str) -> str:
    """Hash: sha256 hex -> JSON {"size": bytes}, the blobs (files uploaded with POST
    /api/blobs, workers/blobs.py) on one store's disk, so any API replica answers HEAD
    /api/blobs and knows where to create a model from them. Like ``catalog``, it mirrors a
    disk: the store rewrites it whole when it starts or finds Redis emptied, edits it on every
    upload, fetch and cleanup, and readers ignore stores that are not alive. TTL =
    common/catalog.py's CATALOG_TTL_S, set again by every heartbeat of the store."""
    return f"{PREFIX}:blobs:{store_id}"


def pull_job_id(store_id: str, model: str) -> str:
    """One pull per model per store at a time: a second client asking for the same model
    finds this job and follows it instead of starting another download."""
    return f"pull:{store_id}:{model}"


def pull_record(store_id: str, model: str) -> str:
    """JSON state of the latest pull of a model into a store (phase, bytes per file, error);
    late joiners start from it. TTL = settings.keep_result_s."""
    return f"{PREFIX}:pull:{store_id}:{model}"


def pull_alive(store_id: str, model: str) -> str:
    """Set while a pull worker is running that pull; TTL = settings.heartbeat_ttl_s, refreshed
    every heartbeat. A pull that arq still marks in progress but whose key has lapsed lost
    its worker (killed), and the next client starts it again."""
    return f"{PREFIX}:pull-alive:{store_id}:{model}"


def push_job_id(store_id: str, token: str) -> str:
    """A push is one client's (nobody joins it): its id is new each time (``token``)."""
    return f"push:{store_id}:{token}"


def push_alive(job_id: str) -> str:
    """Set while a pull worker is running that push; TTL = settings.heartbeat_ttl_s, refreshed
    every heartbeat, so the API tells a push whose worker was killed from a slow one."""
    return f"{PREFIX}:push-alive:{job_id}"


# ---------------------------------------------------------------- routing (api/routing.py)


def route(job_id: str) -> str:
    """The worker a queued job is routed to (api/routing.py). TTL: settings.route_hold_s, the
    time only that worker may take it; after it any worker may (the shared queue stays the
    safety net: a job routed to a worker that died or stalled is taken by another)."""
    return f"{PREFIX}:route:{job_id}"


def routed(worker_id: str) -> str:
    """Zset: ids of the jobs routed to a worker and not taken yet, scored by when the route
    lapses (ms): the routing's count of what waits for it. TTL: 1 hour, renewed by every add;
    the worker drops lapsed members every heartbeat."""
    return f"{PREFIX}:routed:{worker_id}"


def busy(worker_id: str) -> str:
    """Hash: model -> jobs the worker runs now, counted up by the script that claims them and
    down with each job's end (so Redis sees every end after its claim). TTL: the heartbeat TTL,
    renewed every heartbeat, so a dead worker's lapses with its record."""
    return f"{PREFIX}:busy:{worker_id}"


def prefix_owner(model: str, prefix_hash: str) -> str:
    """The worker that last ran a prompt beginning with this prefix (api/routing.py), whose
    prefix cache likely holds it. TTL: 10 minutes, renewed by each prompt that shares it."""
    return f"{PREFIX}:prefix:{model}:{prefix_hash}"


def route_counts(worker_id: str) -> str:
    """Hash: "<model>\t<reason>" -> jobs routed to the worker for that reason (/metrics).
    TTL: 1 day, renewed by every count: a worker gone a day takes its counters with it."""
    return f"{PREFIX}:route-counts:{worker_id}"


# Zset of models waiting for a worker to load them, scored by request time (ms). No TTL:
# a worker removes a model when it claims it, and the API when it gives up waiting; its
# housekeeping drops requests older than settings.load_timeout_s for which no job waits.
LOADS = f"{PREFIX}:loads"


def load_record(model: str) -> str:
    """JSON outcome of the latest attempt to load a model (worker, error, time); tells
    waiting requests why a load failed. TTL = settings.keep_result_s."""
    return f"{PREFIX}:load:{model}"


def keep_alive(model: str) -> str:
    """The keep_alive (seconds, -1 = forever) the latest request for a model asked for.
    Absent means the worker's default. No TTL: it is the model's current setting, one short
    key per model ever requested; a request without keep_alive deletes it."""
    return f"{PREFIX}:keep-alive:{model}"


# ---------------------------------------------------------------- OpenAI files and batches
# All of these live for settings.file_ttl_s (OpenAI keeps batch files for 30 days).


def file_content(file_id: str) -> str:
    """The bytes of an uploaded (or batch output) file."""
    return f"{PREFIX}:file:{file_id}"


def file_meta(file_id: str) -> str:
    """JSON: OpenAI's file object (name, size, purpose, created_at)."""
    return f"{PREFIX}:file-meta:{file_id}"


# Zsets of file ids and batch ids by creation time (s), for listing. No TTL: shared; members
# older than settings.file_ttl_s are dropped whenever one is added.
FILES = f"{PREFIX}:files"
BATCHES = f"{PREFIX}:batches"

# The file storage quota (api/file_quota.py): bytes of every stored file (hash: file id ->
# bytes), when each expires (zset: file id -> expiry time, s) and their sum (integer). No TTL:
# shared; entries leave when their file is deleted or, past its expiry time, on the next
# reservation, so the sum follows files that Redis expired on its own.
FILE_SIZES = f"{PREFIX}:file-sizes"
FILE_EXPIRY = f"{PREFIX}:file-expiry"
FILE_BYTES = f"{PREFIX}:file-bytes"


def batch(batch_id: str) -> str:
    """JSON: OpenAI's batch object, as last written by the API (status, times, file ids)."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_finishing(batch_id: str) -> str:
    """Lock held by the API replica writing a batch's output files. TTL 60 s."""
    return f"{PREFIX}:batch-finishing:{batch_id}"


def batch_checked(batch_id: str) -> str:
    """Marker: a batch's running lines were just checked for a dead worker. TTL 5 s."""
    return f"{PREFIX}:batch-checked:{batch_id}"


def batch_lines(batch_id: str) -> str:
    """JSON list, one entry per input line: its custom_id, the model, the job that runs it (if any)."""
    return f"{PREFIX}:batch-lines:{batch_id}"


def batch_results(batch_id: str) -> str:
    """Hash: line index -> how that line ended (the answer, or the error). Written once per
    line, by the worker that ran it or by the API for lines that never ran."""
    return f"{PREFIX}:batch-results:{batch_id}"


def batch_counts(batch_id: str) -> str:
    """Hash: completed, failed: lines ended so far (OpenAI's request_counts while it runs)."""
    return f"{PREFIX}:batch-counts:{batch_id}"
