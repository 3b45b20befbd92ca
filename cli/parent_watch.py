"""Engine processes end when the worker that started them is gone.

vLLM runs its engine core (and its workers) in child processes started with
multiprocessing's spawn, which imports the parent's main module in each child: cli.main,
whether the worker was started as `vllama worker` (the console script imports cli.main at
top level) or as `python -m cli worker` (cli/__main__.py runs cli.main as the main module).
cli.main calls :func:`die_with_parent` when it is imported, so what must stay true is that
every entry point makes cli.main importable by the children that way.

serve's own children (redis-server, the workers) need no watch: the kernel signals them when
serve dies (cli/spawn.py). That cannot serve here: it follows the thread that forked, and
vLLM may start its engine from a thread that ends before the engine does.
"""

from __future__ import annotations

import os
import signal
import threading
import time


def die_with_parent() -> None:
    """In a spawned child only: SIGKILL itself once its parent is gone.

    A worker killed with SIGKILL (the OOM killer, `kill -9`) runs no cleanup, and its engine
    core would live on, orphaned, holding memory and CPU (and a GPU); each child therefore
    watches its parent. Anywhere else this does nothing.
    """
    # How multiprocessing's spawn starts a child. Neither sys.argv (already the parent's)
    # nor parent_process() (not set up yet) tells while the child imports the main module.
    try:
        with open("/proc/self/cmdline", "rb") as f:
            if b"--multiprocessing-fork" not in f.read():
                return
    except OSError:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="vllama-parent-watch", daemon=True).start()
