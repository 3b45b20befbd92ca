"""Fixtures of the multi-host fault tests: a fresh cluster per test, torn down whatever happens.

These tests need root (network namespaces) and iproute2's ``ip``. CI has both, so their
absence is a failure with the reason, not a skip that would quietly hide the fault tests.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.multihost.cluster import Cluster
from tests.multihost.netns import sweep_stale


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "multihost: runs a cluster over network namespaces (root, iproute2)")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keep each phase's report on the test, so the cluster fixture knows whether to print logs."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def netns_capable() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("they must run as root (network namespaces, veth pairs, a bridge)")
    if shutil.which("ip") is None:
        problems.append("iproute2's `ip` command is missing (apt-get install iproute2)")
    if shutil.which("unshare") is None:
        problems.append("util-linux's `unshare` is missing (each host gets its own host name)")
    if problems:
        pytest.fail("the multi-host tests cannot run: " + "; ".join(problems), pytrace=False)
    sweep_stale()


@pytest.fixture
def make_cluster(netns_capable: None, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(**kw)`` starts a Cluster (see its arguments); all are stopped and their
    namespaces removed at the end of the test, and their logs printed if it failed."""
    clusters: list[Cluster] = []

    def make(**kw: object) -> Cluster:
        cluster = Cluster(tmp_path / f"cluster{len(clusters)}", **kw)
        clusters.append(cluster)
        return cluster.start()

    try:
        yield make
    finally:
        failed = any(getattr(getattr(request.node, f"report_{when}", None), "failed", False)
                     for when in ("setup", "call"))
        for cluster in clusters:
            if failed:
                print(f"\n========== logs of the cluster in {cluster.tmp} ==========\n{cluster.log_tails()}")
            cluster.stop()


@pytest.fixture
async def redis_of() -> Callable[[Cluster], aioredis.Redis]:
    """``redis_of(cluster)``: an async client of the cluster's Redis, from the test's host."""
    clients: list[aioredis.Redis] = []

    def connect(cluster: Cluster) -> aioredis.Redis:
        client = aioredis.Redis.from_url(cluster.redis_url, socket_connect_timeout=2, socket_timeout=10)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        await client.aclose()
