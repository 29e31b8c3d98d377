"""Every script runs on a real three-master Redis Cluster: a queue's keys share one hash slot.

The cluster is three local redis-server processes in cluster mode, joined with
`redis-cli --cluster create`; the client is redis-py's cluster client, which routes each
script call by its first key, so a key outside the queue's slot would fail with CROSSSLOT.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from redis.cluster import RedisCluster

from conveyor import scripts
from conveyor.keys import PRIORITY_CLASSES
from conveyor.local import RedisServer, free_port
from conveyor.queue import Queue


def _cluster_port() -> int:
    # A cluster node also listens on its port + 10000, so the port must stay below 55536.
    while (port := free_port()) > 55535:
        pass
    return port


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    nodes = [
        RedisServer(
            port=_cluster_port(),
            extra_args=("--cluster-enabled", "yes", "--cluster-node-timeout", "2000"),
        )
        for _ in range(3)
    ]
    for node in nodes:
        node.extra_args += ("--cluster-config-file", str(node.directory / "nodes.conf"))
        node.start()
    try:
        cli = shutil.which("redis-cli")
        assert cli, "redis-cli ships with redis-server; bootstrap installs it"
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        client = RedisCluster(host="127.0.0.1", port=nodes[0].port)
        deadline = time.monotonic() + 30
        while client.cluster_info().get("cluster_state") != "ok":
            assert time.monotonic() < deadline, "cluster did not converge"
            time.sleep(0.2)
        yield client
        client.close()
    finally:
        for node in nodes:
            node.cleanup()


def test_every_queue_operation_runs_on_a_three_master_cluster(cluster: RedisCluster) -> None:
    # The queues spread over the masters; the hash tag, not luck, keeps each one on one node.
    nodes = set()
    for name in ("emails", "exports", "webhooks"):
        queue = Queue(cluster, name)  # type: ignore[arg-type]
        nodes.add(cluster.get_node_from_key(queue.keys.job("x")).name)
        keys = queue.keys.script_keys
        assert {cluster.keyslot(k) for k in keys} == {cluster.keyslot(keys[0])}

        first = queue.enqueue("send", {"n": 1}, priority="critical", dedup_key="once")
        again = queue.enqueue("send", {"n": 2}, priority="critical", dedup_key="once")
        assert (first.id, first.created, again.created) == (again.id, True, False)
        queue.enqueue_batch("send", [{"n": i} for i in range(10)], priority="low", group="acme")
        queue.enqueue("later", {}, delay=0.05, max_attempts=1)

        claimed = scripts.CLAIM.run(
            cluster, keys, [100, 30_000, "w/1", len(PRIORITY_CLASSES), *PRIORITY_CLASSES]
        )
        jobs = claimed[4:]
        assert [j[2] for j in jobs] == [b"critical"] + [b"low"] * 10
        assert scripts.ACK.run(cluster, keys, [jobs[0][0], jobs[0][1], 1]) == []
        outcome = scripts.FAIL.run(
            cluster, keys, [jobs[1][0], jobs[1][1], "error", "boom", 1, -1, -1]
        )
        assert outcome[0][1] == b"dead"
        report = queue.replay([jobs[1][0].decode()])
        assert report.replayed == 1
        assert scripts.HANDBACK.run(cluster, keys, [jobs[2][0], jobs[2][1]]) == []
        # A claim that carries a worker's acks (and claims nothing itself).
        carried = scripts.CLAIM.run(
            cluster, keys, [0, 30_000, "w/2", 1, "low", jobs[3][0], jobs[3][1], 2]
        )
        assert carried[2:] == [[], b""]
        assert not cluster.exists(queue.keys.job(jobs[3][0].decode()))

        time.sleep(0.1)
        scripts.RECOVER.run(cluster, keys, [100, *PRIORITY_CLASSES])
        stats = {row.priority: row for row in queue.stats()}
        assert stats["normal"].ready == 1
        assert stats["low"].ready == 2
        assert stats["low"].in_flight == 7
        assert cluster.xlen(queue.keys.events) > 0
    assert len(nodes) > 1
