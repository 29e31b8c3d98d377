"""The producer and admin API: enqueue, inspect, replay, limit, pause.

``Queue`` is synchronous (web apps, scripts, the CLI); ``AsyncQueue`` offers the enqueue path
to asyncio code. Both are thin: every state change is one Lua script (see ``scripts``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis
import redis.asyncio

from conveyor import scripts
from conveyor.config import QueueConfig
from conveyor.connection import connect
from conveyor.errors import (
    BackendUnavailable,
    ConfigError,
    InvalidJob,
    JobNotFound,
    translate_redis_error,
)
from conveyor.job import DEFAULT_MAX_PAYLOAD, JobInfo, JobSpec, encode_payload
from conveyor.keys import PRIORITY_CLASSES, Keyspace
from conveyor.metrics import JOBS_DEDUPLICATED, JOBS_ENQUEUED, PAYLOADS_REFUSED

BATCH_LIMIT = 10_000
"""Jobs per enqueue round trip; larger batches are split (each chunk is atomic)."""


class Enqueued(NamedTuple):
    id: str
    created: bool
    """False when a live deduplication key returned an earlier job's id."""


@dataclass(frozen=True)
class ClassStats:
    priority: str
    ready: int
    due_delayed: int
    future_delayed: int
    in_flight: int
    dead: int
    oldest_ready_age: float | None
    """Seconds the oldest ready job has waited (among the first 100 groups), or None."""
    limited_groups: int
    rate_limit_deferrals: int = 0
    """Times, since the queue was created, a group's next job waited for its rate limit."""
    replayed: int = 0
    """Dead letters of this class replayed since the queue was created."""

    @property
    def backlog(self) -> int:
        """What is really waiting or running: the autoscaler's signal."""
        return self.ready + self.due_delayed + self.in_flight


@dataclass
class _Batch:
    """One enqueue.lua call: ARGV plus the (job type, class) of each job, for metrics."""

    args: list[Any] = field(default_factory=lambda: [0])
    labels: list[tuple[str, str]] = field(default_factory=list)


class _BatchBuilder:
    """Encodes jobs into calls of at most ``BATCH_LIMIT`` jobs. Consecutive jobs that share
    their options form one run, sent once; per job travel only the payload and, if any job
    of the run has one, the dedup key (a bulk enqueue without keys sends one value per job)."""

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self.batches: list[_Batch] = []
        self._batch = _Batch()
        self._template: tuple[Any, ...] | None = None
        self._payloads: list[bytes] = []
        self._dedup_keys: list[str] = []

    def add(self, spec: JobSpec) -> None:
        try:
            payload = spec.encoded_payload(self.max_payload)
        except InvalidJob:
            PAYLOADS_REFUSED.labels(job_type=spec.type).inc()
            raise
        if len(self._batch.labels) == BATCH_LIMIT:
            self._end_batch()
        template = spec.template()
        if template != self._template:
            self._end_run()
            self._template = template
        self._payloads.append(payload)
        self._dedup_keys.append(spec.dedup_key)
        self._batch.labels.append((spec.type, spec.priority))

    def add_uniform(self, first: JobSpec, payloads: Iterable[Any]) -> None:
        """Jobs that share ``first``'s options (validated once) and differ only in payload."""
        template, label, key = first.template(), (first.type, first.priority), first.dedup_key
        for payload in payloads:
            try:
                encoded = encode_payload(payload, self.max_payload)
            except InvalidJob:
                PAYLOADS_REFUSED.labels(job_type=first.type).inc()
                raise
            if len(self._batch.labels) == BATCH_LIMIT:
                self._end_batch()
            if template != self._template:
                self._end_run()
                self._template = template
            self._payloads.append(encoded)
            self._dedup_keys.append(key)
            self._batch.labels.append(label)

    def _end_run(self) -> None:
        if self._template is None or not self._payloads:
            return
        args = self._batch.args
        args[0] += 1
        args.extend(self._template)
        args.append(len(self._payloads))
        if any(self._dedup_keys):
            args.append(1)
            for payload, key in zip(self._payloads, self._dedup_keys, strict=True):
                args += (payload, key)
        else:
            args.append(0)
            args.extend(self._payloads)
        self._payloads, self._dedup_keys = [], []

    def _end_batch(self) -> None:
        self._end_run()
        if self._batch.labels:
            self.batches.append(self._batch)
        self._batch, self._template = _Batch(), None

    def finish(self) -> list[_Batch]:
        self._end_batch()
        return self.batches


def _batches(specs: Iterable[JobSpec], max_payload: int) -> list[_Batch]:
    builder = _BatchBuilder(max_payload)
    for spec in specs:
        builder.add(spec)
    return builder.finish()


def _uniform_batches(
    job_type: str, payloads: Iterable[Any], options: dict[str, Any], max_payload: int
) -> list[_Batch]:
    builder = _BatchBuilder(max_payload)
    builder.add_uniform(JobSpec(job_type, None, **options), payloads)
    return builder.finish()


def _count(results: list[Enqueued], labels: list[tuple[str, str]]) -> None:
    if all(result.created for result in results):
        tally: Counter[tuple[bool, str, str]] = Counter()
        for (job_type, priority), n in Counter(labels).items():
            tally[True, job_type, priority] = n
    else:
        tally = Counter(
            (result.created, *label) for result, label in zip(results, labels, strict=True)
        )
    for (created, job_type, priority), n in tally.items():
        counter = JOBS_ENQUEUED if created else JOBS_DEDUPLICATED
        counter.labels(job_type=job_type, priority=priority).inc(n)


def _parse_enqueued(raw: list[Any]) -> list[Enqueued]:
    if raw and raw[0] == b"+":
        # Every job was created: enqueue.lua sent the id range instead of the ids.
        _, now_ms, first, count = raw
        prefix = f"{now_ms:013d}-"
        return [Enqueued(f"{prefix}{seq:016d}", True) for seq in range(first, first + count)]
    return [Enqueued(raw[i].decode(), raw[i + 1] == 1) for i in range(0, len(raw), 2)]


def _wrong_type(reply: Any) -> bool:
    return isinstance(reply, redis.exceptions.ResponseError) and str(reply).startswith("WRONGTYPE")


def _replicated(raw: Any, confirmed: Any, wanted: int, timeout: float) -> list[Enqueued]:
    """The reply of an ENQUEUE + WAIT pipeline; raises unless ``wanted`` replicas hold it."""
    for reply in (raw, confirmed):
        if isinstance(reply, redis.exceptions.RedisError):
            raise translate_redis_error(reply, "enqueue") from reply
    if int(confirmed) < wanted:
        # The primary stored the jobs but cannot vouch they would survive a failover: the
        # caller must not count them as accepted (a retry with a dedup key is harmless).
        raise BackendUnavailable(
            f"enqueue reached {confirmed} of {wanted} replicas within {timeout:g}s;"
            " the jobs may or may not be stored"
        )
    return _parse_enqueued(raw)


def _replicated_pipeline(
    client: Any, keys: Sequence[str | bytes], args: list[Any], queue: Any
) -> Any:
    """ENQUEUE then WAIT in one pipeline, so WAIT runs on the connection that wrote: it counts
    the replicas that acknowledged that connection's writes. Sync or asyncio client alike."""
    pipe = client.pipeline(transaction=False)
    pipe.fcall(scripts.ENQUEUE.function, len(keys), *keys, *args)
    pipe.wait(queue.wait_for_replicas, round(queue.replica_timeout * 1000))
    return pipe


def _check_replicated_client(client: Any, wait_for_replicas: int) -> None:
    if wait_for_replicas and isinstance(client, redis.RedisCluster | redis.asyncio.RedisCluster):
        # WAIT must reach the node that took the write; the cluster client routes it elsewhere.
        raise ConfigError("wait_for_replicas is not supported on a Redis Cluster client")


def parse_stats(raw: list[Any]) -> list[ClassStats]:
    now_ms = int(raw[0])
    out = []
    for row in raw[1:]:
        oldest = int(row[6])
        out.append(
            ClassStats(
                priority=row[0].decode(),
                ready=int(row[1]),
                due_delayed=int(row[2]),
                future_delayed=int(row[3]),
                in_flight=int(row[4]),
                dead=int(row[5]),
                oldest_ready_age=None if oldest < 0 else max(0, now_ms - oldest) / 1000,
                limited_groups=int(row[7]),
                rate_limit_deferrals=int(row[8]),
                replayed=int(row[9]),
            )
        )
    return out


class Queue:
    """A named queue on one Redis (or Redis Cluster: all its keys share one hash slot).

    ``wait_for_replicas``: an enqueue returns only once that many replicas hold its jobs
    (Redis ``WAIT``, at most ``replica_timeout`` seconds), and raises ``BackendUnavailable``
    otherwise. Replication is asynchronous, so without it a job the primary accepted can
    vanish in a failover; with it, a job the caller was told about is on a replica, and
    Sentinel promotes the replica with the most data. With one replica, use 1; with several,
    1 holds unless ``replica-priority`` or a lagging link makes Sentinel promote another one,
    and the number of replicas is the strict form. 0 (the default) skips the wait.
    """

    def __init__(
        self,
        client: redis.Redis,
        name: str = "default",
        *,
        prefix: str = "conveyor",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        wait_for_replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        _check_replicated_client(client, wait_for_replicas)
        self.client = client
        self.keys = Keyspace(name, prefix)
        self.max_payload = max_payload
        self.wait_for_replicas = wait_for_replicas
        self.replica_timeout = replica_timeout
        # Encoded once: redis-py would otherwise encode all the key names on every call.
        self._script_keys = [k.encode() for k in self.keys.script_keys]

    @classmethod
    def from_url(cls, url: str, name: str = "default", **kwargs: Any) -> Queue:
        """A queue on ``url``: ``redis://``, ``rediss://``, ``unix://`` or a Sentinel URL
        (``conveyor.connection``)."""
        return cls(connect(url, health_check_interval=30), name, **kwargs)

    def _run(self, script: scripts.LuaScript, args: list[Any]) -> Any:
        return script.run(self.client, self._script_keys, args)

    def _redis(self, operation: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except redis.exceptions.RedisError as exc:
            raise translate_redis_error(exc, operation) from exc

    # -- producing -----------------------------------------------------------------------------

    def enqueue(self, job_type: str, payload: Any = None, **options: Any) -> Enqueued:
        """Enqueue one job; ``options`` are the fields of ``JobSpec``."""
        spec = JobSpec(job_type, {} if payload is None else payload, **options)
        return self.enqueue_many([spec])[0]

    def enqueue_many(self, specs: Iterable[JobSpec]) -> list[Enqueued]:
        """Enqueue many jobs, up to ``BATCH_LIMIT`` per round trip, each chunk atomically.

        Every job is validated before anything is sent, so one invalid job stores nothing.
        """
        return self._send(_batches(specs, self.max_payload))

    def _send(self, batches: list[_Batch]) -> list[Enqueued]:
        results: list[Enqueued] = []
        for batch in batches:
            if self.wait_for_replicas:
                done = self._enqueue_replicated(batch.args)
            else:
                done = _parse_enqueued(self._run(scripts.ENQUEUE, batch.args))
            _count(done, batch.labels)
            results.extend(done)
        return results

    def _enqueue_replicated(self, args: list[Any]) -> list[Enqueued]:
        for first_try in (True, False):
            pipe = _replicated_pipeline(self.client, self._script_keys, args, self)
            try:
                raw, confirmed = pipe.execute(raise_on_error=False)
                if not (first_try and scripts.missing(raw)):
                    break
                scripts.load(self.client)
            except redis.exceptions.RedisError as exc:
                raise translate_redis_error(exc, "enqueue") from exc
        return _replicated(raw, confirmed, self.wait_for_replicas, self.replica_timeout)

    def enqueue_batch(
        self, job_type: str, payloads: Iterable[Any], **options: Any
    ) -> list[Enqueued]:
        """Enqueue one job per payload, all with the same ``JobSpec`` options: the fast path
        for bulk work (options are validated once)."""
        return self._send(_uniform_batches(job_type, payloads, options, self.max_payload))

    # -- inspecting ----------------------------------------------------------------------------

    def get_job(self, job_id: str) -> JobInfo:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.job(job_id))
        pipe.lrange(self.keys.errors(job_id), 0, -1)
        try:
            raw, errors = pipe.execute(raise_on_error=False)
        except redis.exceptions.RedisError as exc:
            raise translate_redis_error(exc, "get_job") from exc
        if _wrong_type(errors):
            errors = []
        if _wrong_type(raw):
            # Something else wrote a key of another type under the job's name; the scripts
            # file such an id as a dead letter (read_job in the Lua prelude).
            return JobInfo.from_redis(job_id, {b"s": b"unreadable", b"dr": b"invalid_job"}, [])
        for reply in (raw, errors):
            if isinstance(reply, redis.exceptions.RedisError):
                raise translate_redis_error(reply, "get_job") from reply
        if not raw:
            raise JobNotFound(f"no job {job_id} in queue {self.keys.queue}")
        return JobInfo.from_redis(job_id, raw, errors)

    def stats(self, classes: Iterable[str] = PRIORITY_CLASSES) -> list[ClassStats]:
        return parse_stats(self._run(scripts.STATS, list(classes)))

    # -- dead letters --------------------------------------------------------------------------

    def dead_letters(
        self,
        *,
        job_type: str | None = None,
        group: str | None = None,
        reason: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> Iterator[JobInfo]:
        """Dead letters, oldest first, filtered; times are Unix seconds of dead-lettering."""
        low = "-inf" if since is None else int(since * 1000)
        high = "+inf" if until is None else int(until * 1000)
        offset, found = 0, 0
        while limit is None or found < limit:
            ids = self._redis("dlq", "zrangebyscore", self.keys.dead, low, high, offset, 500)
            if not ids:
                return
            offset += len(ids)
            for raw_id in ids:
                job_id = raw_id.decode()
                try:
                    info = self.get_job(job_id)
                except JobNotFound:
                    continue
                if (
                    (job_type is None or info.type == job_type)
                    and (group is None or info.group == group)
                    and (reason is None or info.dead_reason == reason)
                ):
                    found += 1
                    yield info
                    if limit is not None and found >= limit:
                        return

    def replay(self, job_ids: Iterable[str]) -> ReplayReport:
        """Send dead letters back to ready with a fresh attempt budget; idempotent."""
        report = ReplayReport()
        batch: list[str] = []
        for job_id in job_ids:
            batch.append(job_id)
            if len(batch) == 500:
                report.add(self._run(scripts.REPLAY, batch))
                batch = []
        if batch:
            report.add(self._run(scripts.REPLAY, batch))
        return report

    def replay_all(self, **filters: Any) -> ReplayReport:
        """Replay every dead letter matching the filters of ``dead_letters``."""
        if filters:
            return self.replay([info.id for info in self.dead_letters(**filters)])
        ids = [i.decode() for i in self._redis("dlq", "zrange", self.keys.dead, 0, -1)]
        return self.replay(ids)

    def purge(self, job_ids: Iterable[str]) -> int:
        ids = list(job_ids)
        purged = 0
        for start in range(0, len(ids), 500):
            purged += int(self._run(scripts.PURGE, ids[start : start + 500]))
        return purged

    def release_worker(self, identity: str, message: str) -> int:
        """Recover now the leases of a worker process known to be dead (its supervisor saw it
        die): its jobs retry or dead-letter as ``worker_lost`` without waiting for the leases to
        expire. Returns how many it recovered. Never call this for a process that may be alive:
        its runs would be repeated (never double-acknowledged: their tokens become stale)."""
        return int(self._run(scripts.RELEASE, [f"{identity}/", message, *PRIORITY_CLASSES]))

    # -- settings shared by every process ------------------------------------------------------

    def configure(self, config: QueueConfig) -> None:
        self._redis("configure", "hset", self.keys.config, mapping=config.to_redis())

    def set_rate_limit(self, group: str, count: int, per: float) -> None:
        """Allow ``count`` jobs of ``group`` per ``per`` seconds; group ``*`` sets the default."""
        if not 1 <= count <= 2**53 or not 0.001 <= per <= 100 * 365 * 86400:
            # A window under a millisecond would be stored as 0 ms, which means no limit.
            raise ConfigError("a rate limit needs 1 <= count <= 2**53 and 0.001 s <= per <= 100 y")
        self._limit(group, f"{count}:{round(per * 1000)}")

    def exempt_from_rate_limit(self, group: str) -> None:
        """Let ``group`` run unlimited even when a default limit is set."""
        self._limit(group, "-")

    def clear_rate_limit(self, group: str) -> None:
        """Drop ``group``'s own limit: the default applies to it again."""
        self._limit(group, "")

    def _limit(self, group: str, spec: str) -> None:
        # A group already held back under the old rule is released to the new one at once.
        self._run(scripts.LIMIT, [group, spec, *PRIORITY_CLASSES])

    def rate_limits(self) -> dict[str, str]:
        raw = self._redis("rate_limit", "hgetall", self.keys.limits)
        return {k.decode(): v.decode() for k, v in raw.items()}

    def pause_group(self, group: str) -> None:
        self._redis("pause", "sadd", self.keys.paused, group)

    def resume_group(self, group: str) -> bool:
        return bool(self._run(scripts.RESUME, [group, *PRIORITY_CLASSES]))

    def paused_groups(self) -> set[str]:
        return {g.decode() for g in self._redis("pause", "smembers", self.keys.paused)}


@dataclass
class ReplayReport:
    replayed: int = 0
    missing: list[str] = field(default_factory=list)
    """Dead letters whose job record was gone; removed from the dead-letter index."""
    skipped: int = 0
    """Ids that were not dead letters (already replayed, purged or never dead)."""

    def add(self, raw: list[list[bytes]]) -> None:
        self.replayed += len(raw[0])
        self.missing += [i.decode() for i in raw[1]]
        self.skipped += len(raw[2])


class AsyncQueue:
    """The enqueue path for asyncio applications (``wait_for_replicas``: see ``Queue``)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        name: str = "default",
        *,
        prefix: str = "conveyor",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        wait_for_replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        _check_replicated_client(client, wait_for_replicas)
        self.client = client
        self.keys = Keyspace(name, prefix)
        self.max_payload = max_payload
        self.wait_for_replicas = wait_for_replicas
        self.replica_timeout = replica_timeout

    async def enqueue(self, job_type: str, payload: Any = None, **options: Any) -> Enqueued:
        spec = JobSpec(job_type, {} if payload is None else payload, **options)
        return (await self.enqueue_many([spec]))[0]

    async def enqueue_many(self, specs: Iterable[JobSpec]) -> list[Enqueued]:
        return await self._send(_batches(specs, self.max_payload))

    async def _send(self, batches: list[_Batch]) -> list[Enqueued]:
        results: list[Enqueued] = []
        for batch in batches:
            if self.wait_for_replicas:
                done = await self._enqueue_replicated(batch.args)
            else:
                raw = await scripts.ENQUEUE.arun(self.client, self.keys.script_keys, batch.args)
                done = _parse_enqueued(raw)
            _count(done, batch.labels)
            results.extend(done)
        return results

    async def _enqueue_replicated(self, args: list[Any]) -> list[Enqueued]:
        for first_try in (True, False):
            pipe = _replicated_pipeline(self.client, self.keys.script_keys, args, self)
            try:
                raw, confirmed = await pipe.execute(raise_on_error=False)
                if not (first_try and scripts.missing(raw)):
                    break
                await scripts.aload(self.client)
            except redis.exceptions.RedisError as exc:
                raise translate_redis_error(exc, "enqueue") from exc
        return _replicated(raw, confirmed, self.wait_for_replicas, self.replica_timeout)

    async def enqueue_batch(
        self, job_type: str, payloads: Iterable[Any], **options: Any
    ) -> list[Enqueued]:
        return await self._send(_uniform_batches(job_type, payloads, options, self.max_payload))

    async def stats(self, classes: Iterable[str] = PRIORITY_CLASSES) -> list[ClassStats]:
        raw = await scripts.STATS.arun(self.client, self.keys.script_keys, list(classes))
        return parse_stats(raw)
