"""A host whose wall clock is off, as an unsynchronised machine's is.

Network namespaces share the machine's clock, so the offset is applied per process with
libfaketime (preloaded; it shifts what ``clock_gettime(CLOCK_REALTIME)``, ``time()`` and
``gettimeofday()`` return). The monotonic clock is left alone: on a real machine a wrong wall
clock does not make timers run fast or slow, and asyncio's timers use the monotonic one.
"""

from __future__ import annotations

import glob

# Multi-threaded flavour: workers beat their heartbeat from a thread of their own.
LIBRARY_GLOBS = ("/usr/lib/*/faketime/libfaketimeMT.so.1", "/usr/lib/faketime/libfaketimeMT.so.1",
                 "/usr/local/lib/faketime/libfaketimeMT.so.1")


def find_libfaketime() -> str:
    for pattern in LIBRARY_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(
        "libfaketime is not installed, and the clock-skew tests need it to set one host's clock "
        "off: run scripts/install.sh --test as root (it installs Debian's libfaketime), or "
        "`apt-get install libfaketime`"
    )


def skewed_env(offset: str) -> dict[str, str]:
    """Environment that runs a process with its wall clock ``offset`` off (``"+30s"``, ``"-30s"``)."""
    return {"LD_PRELOAD": find_libfaketime(), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
