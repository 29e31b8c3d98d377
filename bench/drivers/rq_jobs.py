"""RQ job functions; RQ finds them by import path, so they live outside the driver script."""

from driverlib import ack_probe, record_done


def noop(i: int) -> None:
    # RQ's default worker forks a work horse per job, which leaves with os._exit().
    record_done(sync=True)


def probe(seq: int) -> None:
    ack_probe(seq)
