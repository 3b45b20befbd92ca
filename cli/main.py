"""The `vllama` command.

  vllama serve        Redis (private, unless VLLAMA_REDIS_URL is set), the API, a generation
                      worker and a pull worker
  vllama api          the API alone (needs VLLAMA_REDIS_URL)
  vllama worker       one generation worker (needs VLLAMA_REDIS_URL)
  vllama pull-worker  looks after this machine's models: pull, delete, copy (needs VLLAMA_REDIS_URL)
  vllama create       add a model to this machine's store from a local GGUF file
  vllama suggest      models that fit this machine's GPU memory
  vllama pull         pull a model on the running server, with progress bars
  vllama batch        run a JSONL file of requests as an OpenAI batch, with a progress bar
  vllama bench        throughput and time to first token, stack vs engine in-process
  vllama key new      a new API key, and its line for the VLLAMA_API_KEYS file
"""

from __future__ import annotations

import argparse
import logging
import sys

from cli.parent_watch import die_with_parent
from cli.parts import LOG_FORMAT, cmd_api, cmd_pull_worker, cmd_worker, load_settings
from cli.serve import cmd_serve

# In vLLM's engine processes, which import this module (cli/parent_watch.py says how): exit
# when the worker that started them is gone. Elsewhere it does nothing.
die_with_parent()


def cmd_create(args: argparse.Namespace) -> None:
    from pathlib import Path

    from common.errors import VllamaError
    from common.models import canonical_name
    from common.protocol import PullState
    from workers.pull import Progress, import_gguf
    from workers.store import ModelStore

    settings = load_settings()
    gguf = Path(args.gguf).expanduser().resolve()
    if not gguf.is_file():
        sys.exit(f"{gguf}: no such file; give the path of a .gguf file")
    try:
        name = canonical_name(args.name)
        store = ModelStore(settings.model_cache)
        manifest = import_gguf(store, name, gguf, Progress(PullState(model=name, store_id="local")))
    except VllamaError as exc:
        sys.exit(exc.message)
    print(f"created {manifest.name} ({manifest.size / 1e9:.2f} GB) in {store.root}; "
          "running pull workers list it within seconds")


def cmd_key_new(args: argparse.Namespace) -> None:
    """Print a new key once (only its hash goes in the file, so it cannot be shown again)."""
    from common.api_keys import NAME, key_line, new_key

    if not NAME.fullmatch(args.name):
        sys.exit(f"{args.name!r}: a key's name is 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                 "or digit")
    key = new_key()
    print(f"key: {key}")
    print("Give the key to its client; it is not stored anywhere. Add this line to the VLLAMA_API_KEYS file "
          "and restart the API:")
    print(key_line(args.name, key, args.admin))


def cmd_bench(args: argparse.Namespace) -> None:
    from cli.bench import run_bench

    run_bench(args)


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of processes, 1 or more")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    parser = argparse.ArgumentParser(prog="vllama", description="Ollama-compatible server on vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="everything in one command: Redis, the API, a worker and a pull worker")
    p.add_argument("--host"), p.add_argument("--port", type=int), p.add_argument("--model")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("api", help="the HTTP API alone (VLLAMA_REDIS_URL required)")
    p.add_argument("--host"), p.add_argument("--port", type=int)
    p.add_argument("--workers", type=_at_least_one, metavar="N",
                   help="API processes sharing the port (default: VLLAMA_API_WORKERS, else 1)")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("worker", help="one generation worker (VLLAMA_REDIS_URL required)")
    p.add_argument("--model")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("pull-worker", help="this machine's model store: pull, delete, copy (VLLAMA_REDIS_URL required)")
    p.set_defaults(func=cmd_pull_worker)

    p = sub.add_parser("create", help="add a model to this machine's store from a local GGUF file")
    p.add_argument("name", help="the model's name, e.g. mymodel:7b")
    p.add_argument("--from", dest="gguf", required=True, metavar="FILE.gguf", help="the GGUF file")
    p.set_defaults(func=cmd_create)

    from cli import client, suggest

    suggest.add_parser(sub)
    client.add_parsers(sub)

    p = sub.add_parser("bench", help="tokens/s and time to first token: stack vs engine")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    p.add_argument("--num-predict", type=int, default=64)
    p.add_argument("--requests-per-level", type=int, default=0, help="0 = 2x the concurrency (min 4)")
    p.add_argument("--repeats", type=int, default=3, help="runs per level; the median is reported")
    p.add_argument("--model")
    p.add_argument("--during-batch", type=int, default=0, metavar="N",
                   help="instead: time to first token idle and behind N batch-class (then interactive) jobs")
    p.add_argument("--vary-length", action="store_true",
                   help="ask each request for 0.5x-1.5x of --num-predict (the same for every way measured)")
    p.add_argument("--peer", action="store_true",
                   help="instead: vLLama's /v1/completions against vLLM's own OpenAI server on the same model")
    p.add_argument("--workers", metavar="N,N,...",
                   help="instead: the stack alone with this many workers each (e.g. 1,2,4), throughput side by side")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("key", help="API keys: `vllama key new NAME [--admin]`")
    key_sub = p.add_subparsers(dest="key_command", required=True)
    p = key_sub.add_parser("new", help="print a new random key and its line for the VLLAMA_API_KEYS file")
    p.add_argument("name", help="the key's name: its jobs, files and batches are owned by it, /metrics counts by it")
    p.add_argument("--admin", action="store_true", help="the key sees and acts on every client's jobs, files, batches")
    p.set_defaults(func=cmd_key_new)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
