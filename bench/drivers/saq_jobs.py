"""SAQ worker settings, imported by `saq.runner.run` the way the `saq` CLI does."""

from typing import Any

from driverlib import REDIS_URL, ack_probe, record_done
from saq import Queue


async def noop(ctx: dict[str, Any], *, i: int) -> None:
    record_done()


async def probe(ctx: dict[str, Any], *, seq: int) -> None:
    ack_probe(seq)


def make_queue() -> Queue:
    return Queue.from_url(REDIS_URL, name="bench")


# Library defaults otherwise: concurrency=10.
functions: list[Any] = [noop, probe]
settings = {"queue": make_queue(), "functions": functions}
