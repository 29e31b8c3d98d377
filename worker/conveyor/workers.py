"""Worker heartbeats in Redis: who is alive, which pod it is, how busy it is.

The operator reads these to mark idle pods cheaper to delete before a scale-down, and the
dashboard to show what each worker runs. A record expires on its own when heartbeats stop.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import cast

import redis
import redis.asyncio
from redis.typing import EncodableT, FieldT

from conveyor.config import WorkerSettings
from conveyor.errors import translate_redis_error
from conveyor.keys import Keyspace

MAX_LISTED_JOBS = 50


class WorkerRecord:
    def __init__(
        self, client: redis.asyncio.Redis, keys: Keyspace, identity: str, settings: WorkerSettings
    ) -> None:
        self.client = client
        self.keys = keys
        self.identity = identity
        self.ttl = max(10, round(settings.heartbeat_interval * 3))
        self.static: dict[FieldT, EncodableT] = {
            "pod": settings.pod_name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "classes": ",".join(settings.classes),
            "concurrency": settings.concurrency,
            "started": round(time.time() * 1000),
        }

    async def beat(self, busy: int, draining: bool, job_ids: list[str]) -> None:
        key = self.keys.worker(self.identity)
        now_ms = round(time.time() * 1000)
        fields: dict[FieldT, EncodableT] = {
            **self.static,
            "busy": busy,
            "draining": int(draining),
            "jobs": ",".join(job_ids[:MAX_LISTED_JOBS]),
            "beat": now_ms,
        }
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=fields)
                pipe.expire(key, self.ttl)
                pipe.zadd(self.keys.workers, {self.identity: now_ms})
                await pipe.execute()
        except redis.RedisError as exc:
            raise translate_redis_error(exc, "worker heartbeat") from exc

    async def remove(self) -> None:
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.worker(self.identity))
                pipe.zrem(self.keys.workers, self.identity)
                await pipe.execute()
        except redis.RedisError:
            pass  # the record expires by itself


@dataclass(frozen=True)
class WorkerInfo:
    identity: str
    pod: str
    host: str
    pid: int
    classes: tuple[str, ...]
    concurrency: int
    busy: int
    draining: bool
    jobs: tuple[str, ...]
    last_beat: float


def list_workers(client: redis.Redis, keys: Keyspace) -> list[WorkerInfo]:
    """Live workers (records not yet expired), most recent heartbeat first."""
    ids = [i.decode() for i in cast(list[bytes], client.zrevrange(keys.workers, 0, -1))]
    pipe = client.pipeline(transaction=False)
    for identity in ids:
        pipe.hgetall(keys.worker(identity))
    out = []
    for identity, raw in zip(ids, pipe.execute(), strict=True):
        if not raw:
            client.zrem(keys.workers, identity)
            continue
        f = {k.decode(): v.decode() for k, v in raw.items()}
        out.append(
            WorkerInfo(
                identity=identity,
                pod=f.get("pod", ""),
                host=f.get("host", ""),
                pid=int(f.get("pid", 0)),
                classes=tuple(c for c in f.get("classes", "").split(",") if c),
                concurrency=int(f.get("concurrency", 0)),
                busy=int(f.get("busy", 0)),
                draining=f.get("draining") == "1",
                jobs=tuple(j for j in f.get("jobs", "").split(",") if j),
                last_beat=int(f.get("beat", 0)) / 1000,
            )
        )
    return out
