"""Hosts on one machine: a Linux network namespace per host, joined by veth pairs to a bridge.

Each host has its own address, so processes talk to each other only over the (virtual)
network, and a host can be cut off (its link set down) while its processes keep running,
which is what a pulled cable or a partitioned switch looks like to the rest of the cluster.
The root namespace gets an address on the bridge too, so the test can reach the API.

Addresses come from 192.0.2.0/24 (TEST-NET-1, reserved for documentation): nothing here
routes anywhere else. Where the machine's own network already uses that range (some sandboxes
put their real interface there), the next documentation range is used instead, so the test
network never captures real traffic. Each network takes a free /28, and every name includes this
process's id and a counter, so parallel sessions never collide and a crashed session's
leftovers can be recognised (and are removed by the next session, see ``sweep_stale``).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field

NETNS_PREFIX = "vllama-mh"
LINK_PREFIX = "vlm"  # interface names: at most 15 characters, so kept short
# The documentation ranges (RFC 5737), first one not already used by this machine's own network.
TEST_NETS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]
SUBNET_PREFIX = 28  # 14 usable addresses: the root namespace and up to 13 hosts
_counter = itertools.count()


class NetnsError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


@dataclass
class Host:
    """One machine of the cluster: a namespace, its address, and the root side of its link."""

    name: str
    netns: str
    addr: str
    link: str  # the veth end in the root namespace (enslaved to the bridge)
    cut: bool = field(default=False)

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace, under its own host name (its own UTS
        namespace), as separate machines would have: worker ids and store ids start with it."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.name, *argv]


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Networks this machine already reaches: its own addresses and its routes (not the
    default route). A test network must overlap none of them, or it would capture real traffic."""
    addrs = ip("-4", "-o", "addr", "show").stdout
    used = [ipaddress.ip_interface(m).network for m in re.findall(r"inet (\S+)", addrs)]
    for line in ip("-4", "route", "show", "table", "all").stdout.splitlines():
        dest = line.split()[0] if line.strip() else "default"
        if dest in ("default", "broadcast", "local", "unreachable", "blackhole", "prohibit"):
            dest = line.split()[1] if dest != "default" and len(line.split()) > 1 else ""
        try:
            net = ipaddress.ip_network(dest, strict=False)
        except ValueError:
            continue
        if net.prefixlen > 0:
            used.append(net)
    return used


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    for test_net in TEST_NETS:
        subnets = list(test_net.subnets(new_prefix=SUBNET_PREFIX))
        start = (os.getpid() + next(_counter)) % len(subnets)
        for subnet in subnets[start:] + subnets[:start]:
            if not any(subnet.overlaps(u) for u in used):
                return subnet
    raise NetnsError(f"no free /{SUBNET_PREFIX} in {', '.join(map(str, TEST_NETS))}: this machine's own "
                     "network or other test sessions hold them all")


class Network:
    """A bridge, one namespace per named host, and the root namespace on the bridge too.

    ``teardown`` removes everything and is safe to call more than once or after a partial
    ``up``; callers stop the hosts' processes first (``pids`` lists any left)."""

    def __init__(self, host_names: list[str]) -> None:
        n = next(_counter)
        self.tag = f"{os.getpid()}-{n}"
        short = f"{os.getpid():x}-{n:x}"  # pid < 2**22: at most 6 hex digits
        self.bridge = f"{LINK_PREFIX}{short}b"
        self.subnet = _free_subnet()
        addrs = list(self.subnet.hosts())
        self.root_addr = str(addrs[0])
        if len(host_names) > len(addrs) - 1:
            raise NetnsError(f"at most {len(addrs) - 1} hosts fit in a /{SUBNET_PREFIX}")
        self.hosts = {
            name: Host(name=name, netns=f"{NETNS_PREFIX}-{self.tag}-{name}", addr=str(addrs[i + 1]),
                       link=f"{LINK_PREFIX}{short}h{i}")
            for i, name in enumerate(host_names)
        }
        self._created_links: list[str] = []
        self._created_netns: list[str] = []

    @property
    def names(self) -> list[str]:
        """Every namespace and interface name this network uses (to check none is left)."""
        links = [self.bridge] + [n for h in self.hosts.values() for n in (h.link, h.link.replace("h", "p"))]
        return [h.netns for h in self.hosts.values()] + links

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def up(self) -> Network:
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            self._created_links.append(self.bridge)
            ip("addr", "add", f"{self.root_addr}/{self.subnet.prefixlen}", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for host in self.hosts.values():
                self._add_host(host)
        except BaseException:
            self.teardown()
            raise
        return self

    def _add_host(self, host: Host) -> None:
        ip("netns", "add", host.netns)
        self._created_netns.append(host.netns)
        peer = host.link.replace("h", "p")  # temporary name, renamed eth0 inside
        ip("link", "add", host.link, "type", "veth", "peer", "name", peer)
        self._created_links.append(host.link)
        ip("link", "set", peer, "netns", host.netns)
        ip("link", "set", host.link, "master", self.bridge)
        ip("link", "set", host.link, "up")
        ns = ["-n", host.netns]
        ip(*ns, "link", "set", peer, "name", "eth0")
        ip(*ns, "addr", "add", f"{host.addr}/{self.subnet.prefixlen}", "dev", "eth0")
        ip(*ns, "link", "set", "eth0", "up")
        ip(*ns, "link", "set", "lo", "up")

    # ------------------------------------------------------------ faults

    def cut(self, name: str) -> None:
        """Take the host off the network: its packets go nowhere, nobody's reach it. Its
        processes and their TCP connections live on, as behind a pulled cable (no reset is
        sent, so peers notice only by timeouts and heartbeats)."""
        host = self.hosts[name]
        ip("link", "set", host.link, "down")
        host.cut = True

    def restore(self, name: str) -> None:
        host = self.hosts[name]
        ip("link", "set", host.link, "up")
        host.cut = False

    # ------------------------------------------------------------ clean-up

    def pids(self) -> list[int]:
        """Processes still running in any of this network's namespaces."""
        pids: list[int] = []
        for netns in self._created_netns:
            out = ip("netns", "pids", netns, check=False).stdout
            pids += [int(p) for p in out.split()]
        return pids

    def teardown(self) -> None:
        for pid in self.pids():  # ours: started in namespaces this session created
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for netns in reversed(self._created_netns):
            ip("netns", "del", netns, check=False)
        for link in reversed(self._created_links):
            if ip("link", "show", link, check=False).returncode == 0:
                ip("link", "del", link, check=False)
        self._created_netns.clear()
        self._created_links.clear()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove namespaces and links left by sessions that died without cleaning up (their pid
    is gone). Names carry the owning pid, so a live session's are never touched."""
    removed: list[str] = []
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(rf"{NETNS_PREFIX}-(\d+)-\d+-\S+", name)
        if m and not _pid_alive(int(m.group(1))):
            for pid in ip("netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ip("netns", "del", name, check=False)
            removed.append(name)
    for m in re.finditer(rf"^\d+: ({LINK_PREFIX}([0-9a-f]+)-[0-9a-f]+[bhp]\d*)[@:]", ip("-o", "link", "show").stdout,
                         re.M):
        if not _pid_alive(int(m.group(2), 16)):
            ip("link", "del", m.group(1), check=False)
            removed.append(m.group(1))
    return removed
