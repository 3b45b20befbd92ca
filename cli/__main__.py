"""`python -m cli ...`: the same as the `vllama` command.

cli.main is run as ``__main__`` (as ``python -m cli.main`` would) instead of being imported
and called. vLLM starts its engine processes with multiprocessing's spawn, which re-imports
the parent's main module in each child, except when that module is a package's
``__main__``; running cli.main makes it the main module, so every engine process imports it
and its parent watch (cli/main.py) ends the engine when a SIGKILLed worker is gone.
"""

from __future__ import annotations

import runpy

runpy.run_module("cli.main", run_name="__main__", alter_sys=True)
