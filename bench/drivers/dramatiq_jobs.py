"""Dramatiq broker and actors, imported by both the driver and dramatiq's worker processes.

Dramatiq priorities are per actor and only order messages a worker has already prefetched,
so each lane gets its own queue (so a critical message is fetched at all while lows are
waiting) and its own actor priority (so it is run before the prefetched lows).
"""

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from driverlib import REDIS_URL, ack_probe, record_done

broker = RedisBroker(url=REDIS_URL)  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)

QUEUES = {"critical": "bench-critical", "normal": "bench", "low": "bench-low"}
# Lower numbers run first; the default for actors is 0.
PRIORITIES = {"critical": 0, "normal": 10, "low": 100}


def _noop(i: int) -> None:
    record_done()


def _probe(seq: int) -> None:
    ack_probe(seq)


NOOP = {
    lane: dramatiq.actor(actor_name=f"noop_{lane}", queue_name=q, priority=PRIORITIES[lane])(_noop)
    for lane, q in QUEUES.items()
}
PROBE = {
    lane: dramatiq.actor(actor_name=f"probe_{lane}", queue_name=q, priority=PRIORITIES[lane])(
        _probe
    )
    for lane, q in QUEUES.items()
}
