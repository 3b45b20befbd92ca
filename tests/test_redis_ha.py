"""Redis with a password, over TLS, and behind Sentinel through a failover: real redis-server
processes, the whole stack (API, generation worker, pull worker, heartbeat thread) in the
test's event loop with the fake engine, every connection opened from VLLAMA_REDIS_URL.

Run with -s to see the measured failover figures.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
import pytest

from cli.embedded_redis import free_port
from common import keys
from common.redis_conn import RedisConnectError, RedisUrlError, connect, mask, parse_redis_url, sync_client
from tests.fake_stack import MODEL, fake_stack
from tests.harness import Proc, async_wait_until, wait_until
from tests.redis_procs import (SERVICE, TLS_REDIS_SERVER, RedisProc, SentinelCluster, make_tls, redis_server,
                               sentinel_cluster, tls_redis_server)
from workers.fake_engine import FakeEngine


BODY = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 3}}
FAILOVER_BUDGET_S = 30.0


async def _generates(http: httpx.AsyncClient) -> None:
    r = await http.post("/api/generate", json=BODY)
    assert r.status_code == 200, r.text
    assert r.json()["response"] == "tok0 tok1 tok2 "


# ------------------------------------------------------------------ the URL


def test_url_forms_and_what_a_malformed_one_says():
    sentinel = parse_redis_url("redis+sentinel://:pw@10.0.0.1,10.0.0.2:26380,[::1]:26381/cache/2"
                               "?sentinel_password=spw&socket_timeout=5")
    assert sentinel.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26381))
    assert sentinel.service == "cache" and sentinel.node["db"] == 2 and sentinel.node["password"] == "pw"
    assert sentinel.sentinel_node["password"] == "spw" and sentinel.sentinel_node["socket_timeout"] == 5
    assert "pw" not in sentinel.shown.replace("sentinel_password", "")
    direct = parse_redis_url("redis://alice:p%40ss@redis.example:6380/3")
    assert (direct.node["username"], direct.node["password"], direct.node["db"]) == ("alice", "p@ss", 3)
    assert parse_redis_url("rediss://h:6380/0?ssl_cert_reqs=none").tls
    assert mask("redis://u:secret@h/0") == "redis://u:***@h/0"

    for bad, says in [
        ("redis+sentinel://h1:26379,h2:26379", "names the service"),
        ("redis+sentinel://h1:x/mymaster", "not a port number"),
        ("http://h:6379", "is not a Redis URL"),
        ("redis://h/0?ssl_ca_certs=/ca.pem", "needs TLS"),
        ("rediss://h/0?ssl_ca_certs=/no/such/ca.pem", "no such file"),
        ("redis://h/0?sentinel_password=x", "Sentinel only"),
        ("redis://h/0?pasword=x", "unknown parameter 'pasword'"),
        ("redis://:secret@h/zero", "database"),
    ]:
        with pytest.raises(RedisUrlError) as err:
            parse_redis_url(bad)
        assert str(err.value).startswith("VLLAMA_REDIS_URL: ") and says in str(err.value), str(err.value)
        assert "secret" not in str(err.value)


# ------------------------------------------------------------------ password


async def test_password_and_acl_user_in_the_url_serve_and_a_wrong_one_says_so(tmp_path):
    server = redis_server(tmp_path / "redis", password="s3cret")
    try:
        base = f"127.0.0.1:{server.port}/0"
        async with fake_stack(f"redis://:s3cret@{base}") as stack, stack.client() as http:
            await _generates(http)
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "vllama", "on", ">user-pw", "~*", "&*", "+@all")
        admin.close()
        async with fake_stack(f"redis://vllama:user-pw@{base}") as stack, stack.client() as http:
            await _generates(http)

        for bad in (f"redis://:wrong-pw@{base}", f"redis://{base}", f"redis://vllama:wrong-pw@{base}"):
            with pytest.raises(RedisConnectError) as err:
                await connect(bad, attempts=1)
            message = err.value.message
            assert message.startswith("VLLAMA_REDIS_URL: ") and "password" in message, message
            assert "wrong-pw" not in message
    finally:
        server.stop()


def test_processes_with_a_wrong_password_exit_with_one_clear_line(tmp_path):
    """No traceback: the API, a worker and a pull worker each say what to fix, and exit."""
    server = redis_server(tmp_path / "redis", password="s3cret")
    env = {"VLLAMA_REDIS_URL": f"redis://:wrong-pw@127.0.0.1:{server.port}/0", "VLLAMA_ENGINE": "fake",
           "VLLAMA_MODEL": MODEL, "VLLAMA_HOME": str(tmp_path / "home"), "VLLAMA_PORT": str(free_port())}
    procs = []
    try:
        for command in ("api", "worker", "pull-worker"):
            procs.append(Proc([command], env, tmp_path / f"{command}.log"))
        for proc, command in zip(procs, ("api", "worker", "pull-worker")):
            code = proc.popen.wait(120)
            out = proc.log_path.read_text(errors="replace")
            assert code != 0, f"{command} kept running:\n{out}"
            assert "VLLAMA_REDIS_URL" in out and "password" in out, f"{command}:\n{out}"
            assert "Traceback" not in out and "wrong-pw" not in out, f"{command}:\n{out}"
    finally:
        for proc in procs:
            proc.kill_tree()
            proc.stop()  # closes its log
        server.stop()


# ------------------------------------------------------------------ TLS


needs_tls_redis = pytest.mark.skipif(
    not TLS_REDIS_SERVER.exists(),
    reason="needs a redis-server built with TLS: scripts/install.sh --test installs Debian's (as root)",
)


@needs_tls_redis
async def test_tls_with_client_certificate_and_password_serves_requests(tmp_path):
    tls = make_tls(tmp_path)
    server = tls_redis_server(tmp_path / "redis", tls, password="s3cret")
    try:
        base = f"rediss://:s3cret@127.0.0.1:{server.port}/0?ssl_ca_certs={tls.ca}"
        url = f"{base}&ssl_certfile={tls.client_cert}&ssl_keyfile={tls.client_key}"
        async with fake_stack(url) as stack, stack.client() as http:
            await _generates(http)
            async with http.stream("POST", "/api/generate", json={**BODY, "stream": True}) as r:
                lines = [json.loads(line) async for line in r.aiter_lines() if line]
            assert "".join(c["response"] for c in lines) == "tok0 tok1 tok2 " and lines[-1]["done"]
            heartbeat = sync_client(url)  # the heartbeat thread's kind of client, over TLS too
            assert heartbeat.ping()
            heartbeat.close()

        (tmp_path / "other").mkdir()
        other_ca = make_tls(tmp_path / "other")  # a CA that did not sign the server's certificate
        for bad, says in [
            (f"rediss://:s3cret@127.0.0.1:{server.port}/0?ssl_ca_certs={other_ca.ca}"
             f"&ssl_certfile={tls.client_cert}&ssl_keyfile={tls.client_key}", "ssl_ca_certs"),
            (base, "ssl_certfile"),  # the server asks for a client certificate
            (f"redis://:s3cret@127.0.0.1:{server.port}/0", "rediss://"),
        ]:
            with pytest.raises(RedisConnectError) as err:
                await connect(bad, attempts=1)
            assert err.value.message.startswith("VLLAMA_REDIS_URL: ") and says in err.value.message
    finally:
        server.stop()


# ------------------------------------------------------------------ Sentinel


@dataclass
class Load:
    """Requests in a loop, each one's start, end and outcome recorded (monotonic time)."""

    http: httpx.AsyncClient
    outcomes: list[tuple[float, float, bool]] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._loop(stream)) for stream in (False, True)]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _loop(self, stream: bool) -> None:
        while True:
            started = time.monotonic()
            try:
                r = await self.http.post("/api/generate", json={**BODY, "stream": stream}, timeout=20)
                ok = r.status_code == 200 and json.loads(r.text.strip().split("\n")[-1])["done"] is True
            except (httpx.HTTPError, ValueError, KeyError):
                ok = False
            self.outcomes.append((started, time.monotonic(), ok))
            await asyncio.sleep(0.05 if ok else 0.2)

    def served_since(self, t: float) -> float | None:
        """When the first request started at or after ``t`` succeeded."""
        return min((end for start, end, ok in self.outcomes if ok and start >= t), default=None)

    def failed_since(self, t: float) -> int:
        return sum(1 for start, _, ok in self.outcomes if not ok and start >= t)


async def _statuses(http: httpx.AsyncClient, job_ids: list[str]) -> dict[str, str]:
    statuses = {}
    for job_id in job_ids:
        try:
            r = await http.get(f"/api/jobs/{job_id}", timeout=10)
        except httpx.HTTPError:
            statuses[job_id] = "unreachable"
            continue
        statuses[job_id] = "lost" if r.status_code == 404 else r.json()["status"] if r.status_code == 200 \
            else f"http {r.status_code}"
    return statuses


def _acknowledged_by_replica(cluster: SentinelCluster) -> int:
    """WAIT covers only the calling client's writes, so write once more and wait for that:
    replication is one ordered stream, so everything written before it is on the replica too."""
    client = cluster.primary.client()
    try:
        client.set("vllama-test:replicated", "1")
        return int(client.execute_command("WAIT", 1, 10_000))
    finally:
        client.close()


def _recorded_statuses(proc: RedisProc, job_ids: list[str]) -> dict[str, str]:
    """The jobs' statuses as one Redis server has them (the replica: what survives the kill)."""
    client = proc.client()
    try:
        raws = client.mget([keys.job_record(j) for j in job_ids])
    finally:
        client.close()
    return {j: "lost" if raw is None else json.loads(raw)["status"] for j, raw in zip(job_ids, raws)}


async def test_sentinel_failover_serves_again_and_keeps_acknowledged_jobs(tmp_path):
    jobs = 9
    with sentinel_cluster(tmp_path / "redis") as cluster:
        with pytest.raises(RedisConnectError) as err:  # a service the sentinels do not monitor
            await connect(cluster.url.replace(f"/{SERVICE}/", "/no-such-service/"), attempts=1)
        assert "'no-such-service'" in err.value.message and "sentinel-pw" not in err.value.message

        # Async jobs take 1 s each, 3 at a time: some run and the rest wait when the primary dies.
        engine = FakeEngine(answer_tokens=20, step_s=0.05)
        async with fake_stack(cluster.url, engine=engine, max_jobs=4, pull_worker=True,
                              home=tmp_path / "home") as stack, stack.client() as http:
            load = Load(http)
            load.start()
            try:
                await async_wait_until(lambda: _true(load.served_since(0)), 30, "the first answers")
                submitted = [await http.post("/api/jobs/generate", json={"model": MODEL, "prompt": f"job {i}"})
                             for i in range(jobs)]
                assert all(r.status_code == 202 for r in submitted), [r.text for r in submitted]
                job_ids = [r.json()["id"] for r in submitted]

                async def one_running() -> bool:
                    return "running" in (await _statuses(http, job_ids)).values()

                await async_wait_until(one_running, 30, "an async job to start")
                assert await asyncio.to_thread(_acknowledged_by_replica, cluster) == 1

                cluster.primary.kill()
                killed = time.monotonic()
                # What the new primary will start from: the replica's copy, read before its promotion.
                at_kill = await asyncio.to_thread(_recorded_statuses, cluster.replica, job_ids)
                await async_wait_until(lambda: _true(load.served_since(killed)), 90, "answers after the failover")
                served_again_s = load.served_since(killed) - killed
                failed_requests = load.failed_since(killed)

                # Serving again needs one sentinel naming the new primary; the others learn it
                # from each other within a few seconds (longer on a busy machine).
                await async_wait_until(lambda: asyncio.to_thread(_promoted, cluster), 30,
                                       "every sentinel to name the promoted replica")
                # The heartbeat thread beats on the new primary: a beat that only reached the old
                # one would have expired there by now (fake_stack's TTL is 1 s).
                await asyncio.sleep(2 * stack.settings.heartbeat_ttl_s)
                health = await http.get("/health")
                assert health.status_code == 200, health.text
                assert [w["worker_id"] for w in health.json()["workers"]] == [stack.worker.worker_id]

                waiting = [j for j, s in at_kill.items() if s == "queued"]

                async def waiting_ones_ended() -> bool:
                    statuses = await _statuses(http, waiting)
                    return all(s in ("done", "failed", "cancelled", "lost") for s in statuses.values())

                await async_wait_until(waiting_ones_ended, 120, "the jobs queued at the kill to end", interval_s=0.5)
                await asyncio.sleep(2)  # a little longer for those that were running
                after = await _statuses(http, job_ids)
            finally:
                await load.stop()

    counts = {s: list(after.values()).count(s) for s in ("done", "failed", "cancelled", "running", "lost")}
    running_at_kill = [j for j, s in at_kill.items() if s == "running"]
    print(f"\nSentinel failover: served again {served_again_s:.1f} s after the primary was killed "
          f"({failed_requests} requests failed meanwhile); async jobs: {jobs} accepted and replicated, "
          f"at the kill {len(running_at_kill)} running and {len(waiting)} queued "
          f"({jobs - len(running_at_kill) - len(waiting)} already ended); afterwards "
          + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f"; those running at the kill are now {[after[j] for j in running_at_kill]}")
    assert served_again_s < FAILOVER_BUDGET_S
    assert counts["lost"] == 0, after
    # A job still waiting at the kill loses nothing: it runs on the new primary.
    assert all(after[j] == "done" for j in waiting), (at_kill, after)


def _promoted(cluster) -> bool:
    """Every live sentinel names the replica as the primary."""
    return cluster.master_port() == cluster.replica.port


async def _true(value: object) -> bool:
    return bool(value)


def test_sentinel_failover_with_the_api_and_workers_as_processes(tmp_path):
    """The same failover with `vllama api`, `vllama worker` and `vllama pull-worker` as their
    own processes (uvicorn's event loop, the heartbeat thread, the pull worker's beat)."""
    with sentinel_cluster(tmp_path / "redis") as cluster:
        port = free_port()
        env = {"VLLAMA_REDIS_URL": cluster.url, "VLLAMA_ENGINE": "fake", "VLLAMA_MODEL": MODEL,
               "VLLAMA_HOME": str(tmp_path / "home"), "VLLAMA_PORT": str(port), "VLLAMA_STORE_ID": "ha-store",
               "VLLAMA_HEARTBEAT_INTERVAL_S": "0.5", "VLLAMA_HEARTBEAT_TTL_S": "2"}
        procs = [Proc([command], env, tmp_path / f"{command}.log") for command in ("api", "worker", "pull-worker")]
        try:
            def served() -> bool:
                try:
                    return httpx.post(f"http://127.0.0.1:{port}/api/generate", json=BODY, timeout=10).status_code == 200
                except httpx.HTTPError:
                    return False

            try:
                wait_until(served, 120, "the processes to serve", interval_s=0.5)
                cluster.primary.kill()
                killed, killed_wall = time.monotonic(), time.time()
                wait_until(served, 90, "the processes to serve after the failover", interval_s=0.2)
            except TimeoutError:
                pytest.fail("\n".join(f"--- {p.log_path.name}\n{p.log_tail()}" for p in procs))
            served_again_s = time.monotonic() - killed
            wait_until(lambda: _promoted(cluster), 30, "every sentinel to name the promoted replica")
            assert all(p.alive() for p in procs), "a process ended instead of riding out the failover"

            def store_beats_on_new_primary() -> bool:
                client = cluster.replica.client()
                try:
                    beat_ms = client.zscore(keys.STORES, "ha-store")
                finally:
                    client.close()
                return beat_ms is not None and beat_ms / 1000 > killed_wall

            wait_until(store_beats_on_new_primary, 30, "the pull worker's heartbeat on the new primary")
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
            assert health.status_code == 200 and health.json()["workers"][0]["state"] == "ready", health.text
        finally:
            for proc in procs:
                proc.kill_tree()
                proc.stop()  # closes its log
    print(f"\nSentinel failover, separate processes: served again {served_again_s:.1f} s after the primary "
          "was killed")
    assert served_again_s < FAILOVER_BUDGET_S
