"""The `vllama` command: serve, api, worker, pull-worker, create, pull, batch, suggest, bench.

Nothing under ``common/`` may import this package (nor ``api`` or ``workers``): the CLI wires
the parts together, the parts never reach back into it.
"""
