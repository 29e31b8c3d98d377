"""``conveyor enqueue``: one job from arguments, or many from JSON lines on standard input.

Input from standard input is all or nothing: every line is checked and encoded before the
first job is sent.
"""

from __future__ import annotations

import dataclasses
import sys
from datetime import datetime
from typing import IO, Any

import click
import orjson
from click.core import ParameterSource
from rich.progress import Progress

from conveyor.cli.params import MAX_ERROR, TEXT, one_line
from conveyor.cli.root import Context, console, pass_ctx
from conveyor.errors import ConveyorError
from conveyor.job import Backoff, JobSpec, encode_payload
from conveyor.keys import PRIORITY_CLASSES
from conveyor.queue import BATCH_LIMIT, Queue

STDIN_MAX_JOBS = 1_000_000
STDIN_MAX_BYTES = 256 * 2**20
"""Most jobs and bytes ``enqueue --stdin`` takes in one run: it holds every job in memory
until all are checked, so that one bad line enqueues nothing (``enqueue --help`` quotes both)."""

_JOB_OPTIONS = ("priority", "group", "delay", "dedup_key", "max_attempts", "timeout")
_LINE_OPTIONS = frozenset(f.name for f in dataclasses.fields(JobSpec)) - {"type", "payload"}


@click.command()
@click.argument("job_type", required=False, type=TEXT)
@click.argument("payload", required=False, type=TEXT)
@click.option("--priority", type=click.Choice(PRIORITY_CLASSES), default="normal")
@click.option("--group", type=TEXT, default="")
@click.option("--delay", type=float, default=0.0, help="Seconds before the job may run.")
@click.option("--dedup-key", type=TEXT, default="")
@click.option("--max-attempts", type=int, default=3)
@click.option("--timeout", type=float, default=300.0, help="Seconds per attempt.")
@click.option(
    "--stdin",
    "from_stdin",
    is_flag=True,
    help='Read JSON lines: {"type": ..., "payload": ..., <JobSpec options>}.',
)
@pass_ctx
def enqueue(
    obj: Context, /, job_type: str | None, payload: str | None, from_stdin: bool, **options: Any
) -> None:
    """Enqueue a job (PAYLOAD is JSON), or many from standard input.

    With --stdin, each non-blank line is one job, a JSON object with "type", optional
    "payload" and any JobSpec option ("run_at" in ISO 8601 with a zone, "backoff" an object);
    JOB_TYPE and the other options are refused with --stdin. All or nothing: every line is
    checked and encoded before the first job is sent, and a bad line enqueues nothing; the
    error names its line number. One run takes at most 1,000,000 jobs and 256 MiB; split
    larger input into several runs.

    Jobs are then sent in atomic chunks of 10,000. If Redis fails part-way, the error says how
    many were enqueued; lines with a "dedup_key" make a rerun safe.
    """
    if from_stdin:
        ctx = click.get_current_context()
        given = [name for name in _JOB_OPTIONS if _on_command_line(ctx, name)]
        if job_type is not None or given:
            raise click.UsageError(
                "with --stdin, give the job type and options on each line, not as arguments"
            )
        specs = _read_jobs(sys.stdin.buffer, obj.queue.max_payload)
        created = _send(obj.queue, specs)
        console.print(f"{created} enqueued, {len(specs) - created} deduplicated")
        return
    if not job_type:
        raise click.UsageError("give JOB_TYPE (and PAYLOAD), or --stdin")
    try:
        data = orjson.loads(payload) if payload else {}
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"PAYLOAD is not JSON: {exc}") from exc
    # Not Queue.enqueue, which reads a None payload as "none given": PAYLOAD null is stored.
    (result,) = obj.queue.enqueue_many([JobSpec(job_type, data, **options)])
    click.echo(result.id if result.created else f"{result.id} (deduplicated)")


def _on_command_line(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE


def _read_jobs(stream: IO[bytes], max_payload: int) -> list[JobSpec]:
    """Every job of a JSON-lines stream, checked and encoded; the first bad line, or input
    beyond the limits, raises before anything is sent."""
    specs: list[JobSpec] = []
    budget = STDIN_MAX_BYTES
    number = 0
    # Bounded reads: a line (or a stream without newlines) never takes more than the budget.
    while line := stream.readline(budget + 1):
        number += 1
        budget -= len(line)
        if budget < 0:
            raise click.ClickException(
                f"standard input is over {STDIN_MAX_BYTES:,} bytes (at line {number});"
                " nothing was enqueued: split it into several runs"
            )
        if not line.strip():
            continue
        if len(specs) == STDIN_MAX_JOBS:
            raise click.ClickException(
                f"standard input holds over {STDIN_MAX_JOBS:,} jobs (at line {number});"
                " nothing was enqueued: split it into several runs"
            )
        specs.append(_spec_from_line(number, line, max_payload))
    return specs


def _spec_from_line(number: int, line: bytes, max_payload: int) -> JobSpec:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        # orjson's own position counts from this line alone: its "line 1" would mislead.
        raise click.ClickException(
            f"line {number}, column {exc.colno}: {exc.msg}; nothing was enqueued"
        ) from exc
    try:
        if not isinstance(record, dict) or "type" not in record:
            raise ValueError('each line must be an object with a "type"')
        unknown = sorted(set(record) - _LINE_OPTIONS - {"type", "payload"})
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r:.60}")
        if "backoff" in record:
            record["backoff"] = Backoff(**record["backoff"])
        if record.get("run_at") is not None:
            record["run_at"] = datetime.fromisoformat(record["run_at"])
        job_type = record.pop("type")
        spec = JobSpec(job_type, record.pop("payload", {}), **record)
        # Too large or too deep is found now, not by the send that follows other chunks.
        encode_payload(spec.payload, max_payload)
    except (ValueError, TypeError, ConveyorError) as exc:
        raise click.ClickException(
            one_line(f"line {number}: {exc}", limit=MAX_ERROR - 24) + "; nothing was enqueued"
        ) from exc
    return spec


def _send(queue: Queue, specs: list[JobSpec]) -> int:
    """Enqueue checked jobs a chunk (one atomic round trip) at a time; how many were new."""
    sent = created = 0
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("enqueueing", total=len(specs))
        for start in range(0, len(specs), BATCH_LIMIT):
            chunk = specs[start : start + BATCH_LIMIT]
            try:
                results = queue.enqueue_many(chunk)
            except ConveyorError as exc:
                raise click.ClickException(
                    one_line(
                        f"{sent} of {len(specs)} jobs were enqueued and the next {len(chunk)}"
                        f" may or may not be: {type(exc).__name__}: {exc}"
                    )
                ) from exc
            sent += len(chunk)
            created += sum(result.created for result in results)
            progress.advance(bar, len(chunk))
    return created
