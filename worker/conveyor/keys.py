"""Every Redis key Conveyor uses, in one place.

All keys of one queue share the hash tag ``{<queue>}`` so that every script touches a single
slot and runs unchanged on Redis Cluster. Scripts receive one key, the queue's base
(``Keyspace.script_keys``), and build every name from it: the base, one of
``SCRIPT_KEY_NAMES`` below (the Lua prelude, ``lua/_prelude.lua``, lists the same suffixes in
the same order), then an id, class or group where the key has one.

| key | type | purpose |
| --- | --- | --- |
| ``job:<id>`` | hash | one job: spec, attempt count, state, current lease |
| ``err:<id>`` | list | JSON record of every failed attempt of a job |
| ``ready:<class>`` | zset | groups of a class with ready jobs, scored (ms) by when each may run |
| ``group:<class>:<group>`` | list | ready job ids of one group in one class, FIFO |
| ``delayed:<class>`` | zset | delayed and retrying job ids, scored (ms) by when they are due |
| ``lease:<class>`` | zset | leased job ids, scored (ms) by lease deadline |
| ``dead`` | zset | dead-lettered job ids, scored (ms) by when they died |
| ``dead_class`` | hash | class of each dead letter (its counter stays right if the record goes) |
| ``dedup:<key>`` | string | job id holding a deduplication key, expiring with its window |
| ``rate:<group>`` | string | GCRA theoretical arrival time (ms) of a rate-limited group |
| ``limits`` | hash | rate limit per group, ``<count>:<window ms>``; field ``*`` is the default |
| ``paused`` | set | groups whose jobs are not claimed |
| ``wake:<class>`` | list | wake-up tokens idle workers block on; never holds a job |
| ``events`` | stream | every job transition, read by the history writer |
| ``seq`` | string | counter behind job ids |
| ``counts`` | hash | per class: ``ready:``/``dead:`` sizes, ``deferred:``/``replayed:`` totals |
| ``workers`` | zset | worker ids scored (ms) by their last heartbeat |
| ``worker:<id>`` | hash | one worker's identity, classes and busy slots |
| ``schedule:<name>`` | string | last tick (ms) a recurring schedule enqueued |
| ``config`` | hash | retention and stream bounds the scripts read (see ``QueueConfig``) |
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIORITY_CLASSES: tuple[str, ...] = ("critical", "high", "normal", "low")
"""Priority classes, most urgent first; claim order between classes is strict."""

SCRIPT_KEY_NAMES: tuple[str, ...] = (
    "job:",
    "err:",
    "ready:",
    "group:",
    "delayed:",
    "lease:",
    "dead",
    "dedup:",
    "rate:",
    "limits",
    "paused",
    "wake:",
    "events",
    "seq",
    "counts",
    "workers",
    "worker:",
    "schedule:",
    "config",
    "dead_class",
)


@dataclass(frozen=True)
class Keyspace:
    """Key names of one queue; ``prefix`` lets several deployments share one Redis."""

    queue: str = "default"
    prefix: str = "conveyor"
    base: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.queue or any(c in self.queue for c in "{}: \t\n"):
            raise ValueError(
                f"queue name {self.queue!r} must be non-empty, without {{}}, ':' or spaces"
            )
        object.__setattr__(self, "base", f"{self.prefix}:{{{self.queue}}}:")

    @property
    def script_keys(self) -> list[str]:
        """The KEYS vector every script receives: the base alone. It names the cluster slot
        for routing; the prelude appends the suffixes of ``SCRIPT_KEY_NAMES`` to it."""
        return [self.base]

    def job(self, job_id: str) -> str:
        return f"{self.base}job:{job_id}"

    def errors(self, job_id: str) -> str:
        return f"{self.base}err:{job_id}"

    def ready(self, priority: str) -> str:
        return f"{self.base}ready:{priority}"

    def group(self, priority: str, group: str) -> str:
        return f"{self.base}group:{priority}:{group}"

    def delayed(self, priority: str) -> str:
        return f"{self.base}delayed:{priority}"

    def lease(self, priority: str) -> str:
        return f"{self.base}lease:{priority}"

    def wake(self, priority: str) -> str:
        return f"{self.base}wake:{priority}"

    def dedup(self, key: str) -> str:
        return f"{self.base}dedup:{key}"

    def rate(self, group: str) -> str:
        return f"{self.base}rate:{group}"

    def worker(self, worker_id: str) -> str:
        return f"{self.base}worker:{worker_id}"

    def schedule(self, name: str) -> str:
        return f"{self.base}schedule:{name}"

    @property
    def dead(self) -> str:
        return self.base + "dead"

    @property
    def dead_class(self) -> str:
        return self.base + "dead_class"

    @property
    def limits(self) -> str:
        return self.base + "limits"

    @property
    def paused(self) -> str:
        return self.base + "paused"

    @property
    def events(self) -> str:
        return self.base + "events"

    @property
    def counts(self) -> str:
        return self.base + "counts"

    @property
    def config(self) -> str:
        return self.base + "config"

    @property
    def workers(self) -> str:
        return self.base + "workers"
