"""Conveyor handlers for the benchmark; worker processes import this module by name."""

from __future__ import annotations

from driverlib import ack_probe, record_done

from conveyor.job import Job
from conveyor.registry import task


@task("noop")
async def noop(job: Job) -> None:
    record_done()


@task("probe")
async def probe(job: Job) -> None:
    ack_probe(int(job.payload["seq"]))
