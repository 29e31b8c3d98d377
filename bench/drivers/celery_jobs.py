"""Celery app and tasks; prefork children import this module from the parent's memory.

Redis broker only, no result backend (results are never read, and Celery's documented way to
not pay for them is to have none and ignore them).
"""

from celery import Celery
from driverlib import REDIS_URL, ack_probe, record_done

app = Celery("bench", broker=REDIS_URL)
app.conf.update(
    task_ignore_result=True,
    result_backend=None,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

# On Redis, Celery spreads priorities 0-9 over sub-queues polled in order, 0 first
# (the reverse of AMQP). No priority set means the base queue, i.e. as urgent as 0.
PRIORITIES = {"critical": 0, "normal": None, "low": 9}


@app.task(name="noop")  # type: ignore[untyped-decorator]
def noop(i: int) -> None:
    record_done()


@app.task(name="probe")  # type: ignore[untyped-decorator]
def probe(seq: int) -> None:
    ack_probe(seq)
