"""arq worker settings; `arq.worker.run_worker` reads them like the `arq` CLI does."""

from typing import Any, ClassVar

from arq.connections import RedisSettings
from driverlib import REDIS_URL, ack_probe, record_done


async def noop(ctx: dict[str, Any], i: int) -> None:
    record_done()


async def probe(ctx: dict[str, Any], seq: int) -> None:
    ack_probe(seq)


class WorkerSettings:
    # Library defaults otherwise: max_jobs=10, poll_delay=0.5 s, results kept 1 h.
    functions: ClassVar[list[Any]] = [noop, probe]
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
