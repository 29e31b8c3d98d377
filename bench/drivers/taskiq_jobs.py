"""taskiq broker and tasks; `taskiq worker taskiq_jobs:broker` imports this module.

RedisStreamBroker is the broker the taskiq-redis README shows first and the one with
acknowledgements (the list broker loses a message whose worker dies), so it is the fair
counterpart to queues that lease their jobs.
"""

from driverlib import REDIS_URL, ack_probe, record_done
from taskiq_redis import RedisStreamBroker

broker = RedisStreamBroker(url=REDIS_URL, queue_name="bench")


@broker.task(task_name="noop")
async def noop(i: int) -> None:
    record_done()


@broker.task(task_name="probe")
async def probe(seq: int) -> None:
    ack_probe(seq)
