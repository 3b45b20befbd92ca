"""The multi-host harness itself: hosts reach each other only over their links, a cut link
really cuts, and tearing down leaves nothing behind (namespaces, links, processes)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.multihost.netns import Network, ip

pytestmark = pytest.mark.multihost

LISTEN = ("import socket, sys\ns = socket.socket(); s.bind((sys.argv[1], 8000)); s.listen(); print('up', flush=True)\n"
          "while True: s.accept()[0].close()")


def _reachable(addr: str, timeout_s: float = 1.0) -> bool:
    try:
        socket.create_connection((addr, 8000), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def left_behind(net: Network) -> list[str]:
    namespaces = set(ip("netns", "list").stdout.split())
    links = {line.split(": ")[1].split("@")[0] for line in ip("-o", "link", "show").stdout.splitlines()}
    return [name for name in net.names if name in namespaces | links]


def test_hosts_reach_each_other_a_cut_link_isolates_and_teardown_leaves_nothing(netns_capable):
    net = Network(["a", "b"]).up()
    proc = None
    try:
        hostname = subprocess.run(net["a"].exec_argv(["hostname"]), capture_output=True, text=True, check=True)
        assert hostname.stdout.strip() == "a", "each host has its own host name"
        lo = subprocess.run(net["a"].exec_argv(["ip", "-o", "link", "show", "lo"]), capture_output=True, text=True)
        assert "UP" in lo.stdout, "loopback is up inside a host"
        proc = subprocess.Popen(net["b"].exec_argv([sys.executable, "-c", LISTEN, net["b"].addr]),
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "up"
        assert _reachable(net["b"].addr), "the test (root namespace) reaches a host"
        from_a = subprocess.run(net["a"].exec_argv([sys.executable, "-c",
                                                    f"import socket; socket.create_connection(('{net['b'].addr}', 8000), 2)"]))
        assert from_a.returncode == 0, "host a reaches host b"
        net.cut("b")
        assert not _reachable(net["b"].addr), "a cut host is unreachable"
        net.restore("b")
        deadline = time.monotonic() + 5
        while not _reachable(net["b"].addr) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _reachable(net["b"].addr), "a restored host is reachable again"
        assert net.pids(), "the listener runs inside host b"
    finally:
        net.teardown()
        if proc is not None:
            proc.wait(5)
    assert proc.returncode is not None, "teardown ends the processes left in the hosts"
    assert not left_behind(net), f"left behind: {left_behind(net)}"
