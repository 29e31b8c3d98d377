"""Sending job outcomes to Redis in batches, and never dropping one.

Handlers finish one by one; the reporter sends everything that finished since its last round
trip in one ack call, one fail call and one hand-back call. An outcome that cannot be sent
(Redis down) stays buffered and is sent again with the same lease token once Redis answers:
the token makes a repeat harmless, and a lease that expired meanwhile is reported as stale
instead of completing the job twice.

A busy worker claims again the moment jobs finish, so the claimer takes the buffered acks
along in its claim (``take_acks``) and the reporter sends only what no claim picked up: one
script call per batch of jobs instead of two.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter

from conveyor import metrics
from conveyor.errors import BackendUnavailable, ConveyorError
from conveyor.leases import Ack, Failure, LeaseClient

log = logging.getLogger(__name__)

Labels = tuple[str, str]
MAX_BATCH = 1000


class Outage:
    """Logs one WARNING when a worker process loses Redis and one INFO when it is back,
    however many of its loops (claimer, reporter, heartbeat, sweeper) notice in between."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.reachable = asyncio.Event()
        """Set by any loop that reaches Redis: a reporter backing off retries at once."""

    def failed(self, what: str, exc: BaseException) -> None:
        if self.since is not None:
            log.debug("%s failed again: %s", what, exc)
            return
        self.since = time.monotonic()
        log.warning(
            "Redis unreachable (%s), retrying with backoff: %s",
            what,
            exc,
            extra={"event": "redis_unreachable"},
        )

    def succeeded(self) -> None:
        self.reachable.set()
        if self.since is None:
            return
        log.info(
            "Redis reachable again after %.1fs",
            time.monotonic() - self.since,
            extra={"event": "redis_reconnected"},
        )
        metrics.REDIS_RECONNECTS.inc()
        self.since = None


class Reporter:
    def __init__(self, leases: LeaseClient, outage: Outage | None = None) -> None:
        self.leases = leases
        self.outage = outage or Outage()
        self._acks: list[Ack] = []
        self._ack_labels: list[Labels] = []
        self._fails: list[Failure] = []
        self._fail_labels: dict[str, Labels] = {}
        self._handbacks: list[tuple[str, str]] = []
        self._handback_labels: dict[str, Labels] = {}
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._retrying = False

    def ack(self, job_id: str, token: str, runtime_ms: int, labels: Labels) -> None:
        self._acks.append((job_id, token, runtime_ms))
        self._ack_labels.append(labels)
        self._wake()

    def fail(self, failure: Failure, labels: Labels) -> None:
        self._fails.append(failure)
        self._fail_labels[failure.job_id] = labels
        self._wake()

    def hand_back(self, leases: list[tuple[str, str]], labels: list[Labels] | None = None) -> None:
        self._handbacks.extend(leases)
        for (job_id, _), label in zip(leases, labels or [], strict=False):
            self._handback_labels[job_id] = label
        self._wake()

    def _wake(self) -> None:
        self._idle.clear()
        self._ready.set()

    def take_acks(self) -> tuple[list[Ack], list[Labels]]:
        """Hand the buffered acks to a claim that will carry them. The caller owes either
        ``acked()`` with the claim's answer or ``put_back_acks()`` if the claim failed.
        Nothing while the reporter retries after a failure: it owns the acks until they are
        sent, and logs the recovery where it logged the failure."""
        if self._retrying:
            return [], []
        return self._take_acks()

    def _take_acks(self) -> tuple[list[Ack], list[Labels]]:
        acks, labels = self._acks[:MAX_BATCH], self._ack_labels[:MAX_BATCH]
        del self._acks[: len(acks)], self._ack_labels[: len(acks)]
        return acks, labels

    def put_back_acks(self, acks: list[Ack], labels: list[Labels]) -> None:
        """Acks whose claim failed: the reporter sends them itself, with its retries."""
        if acks:
            self._acks[:0], self._ack_labels[:0] = acks, labels
            self._wake()

    @property
    def pending(self) -> int:
        return len(self._acks) + len(self._fails) + len(self._handbacks)

    async def run(self) -> None:
        failures = 0
        while True:
            await self._ready.wait()
            self._ready.clear()
            # One turn of the loop first: a claimer woken by the same finished jobs takes their
            # acks into its claim; whatever it leaves is sent here.
            await asyncio.sleep(0)
            while self.pending:
                try:
                    await self._send_once()
                except ConveyorError as exc:
                    failures += 1
                    self._retrying = True
                    if isinstance(exc, BackendUnavailable):
                        self.outage.failed("report", exc)
                    if failures == 1:
                        # An outage has its own warning; a refusal by Redis has only this one.
                        log.log(
                            logging.INFO
                            if isinstance(exc, BackendUnavailable)
                            else logging.WARNING,
                            "cannot report %d outcomes yet, retrying: %s",
                            self.pending,
                            exc,
                            extra={"event": "report_retry"},
                        )
                    await self._back_off(failures, outage=isinstance(exc, BackendUnavailable))
                    continue
                except Exception:
                    # A bug must not end the reporter: every later outcome would go unsent
                    # and every job after it would run again once its lease expired.
                    failures += 1
                    self._retrying = True
                    if failures == 1:
                        log.exception(
                            "reporting %d outcomes failed unexpectedly, retrying",
                            self.pending,
                            extra={"event": "report_error"},
                        )
                    await self._back_off(failures)
                    continue
                self.outage.succeeded()
                self._retrying = False
                if failures:
                    log.info(
                        "outcomes reported again after %d failed tries",
                        failures,
                        extra={"event": "report_recovered"},
                    )
                    failures = 0
            self._idle.set()

    async def _back_off(self, failures: int, *, outage: bool = False) -> None:
        """Wait before the next try. After an outage, no longer than until another loop
        reaches Redis again: an outcome sent late lets its lease expire, and the job would run
        again. (A refusal by a reachable Redis waits out its backoff.)"""
        delay = random.uniform(0, min(5.0, 0.05 * 2**failures))
        if not outage:
            await asyncio.sleep(delay)
            return
        self.outage.reachable.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.outage.reachable.wait(), delay)

    async def _send_once(self) -> None:
        if self._acks:
            # Taken out before the await: a claim may take acks from the buffer meanwhile.
            batch, labels = self._take_acks()
            try:
                stale = await self.leases.ack(batch)
            except BaseException:
                self._acks[:0], self._ack_labels[:0] = batch, labels
                raise
            self.acked(batch, labels, stale)
        if self._fails:
            batch_f = self._fails[:MAX_BATCH]
            outcomes = await self.leases.fail(batch_f)
            del self._fails[: len(batch_f)]
            for job_id, outcome, delay_ms in outcomes:
                label = self._fail_labels.pop(job_id, ("", ""))
                self._count_failure(job_id, outcome, delay_ms, label)
        if self._handbacks:
            batch_h = self._handbacks[:MAX_BATCH]
            stale_h = set(await self.leases.hand_back(batch_h))
            del self._handbacks[: len(batch_h)]
            for job_id, _ in batch_h:
                label = self._handback_labels.pop(job_id, ("", ""))
                if job_id not in stale_h:
                    metrics.for_job(*label).handed_back.inc()

    @staticmethod
    def acked(batch: list[Ack], labels: list[Labels], stale_ids: list[str]) -> None:
        """Count and log the answer to acks sent by the reporter or carried by a claim."""
        stale = set(stale_ids)
        completed: Counter[Labels] = Counter()
        for (job_id, _, _), label in zip(batch, labels, strict=True):
            if job_id in stale:
                metrics.for_job(*label).lost.inc()
                log.warning(
                    "ack of job %s rejected: its lease had expired and the job was "
                    "recovered; this run's result is discarded",
                    job_id,
                    extra={"event": "ack_stale", "job_id": job_id},
                )
            else:
                completed[label] += 1
        for label, n in completed.items():
            metrics.for_job(*label).completed.inc(n)

    @staticmethod
    def _count_failure(job_id: str, outcome: str, delay_ms: int, label: Labels) -> None:
        if outcome == "stale":
            metrics.for_job(*label).lost.inc()
            log.warning(
                "failure of job %s rejected: lease already lost",
                job_id,
                extra={"event": "fail_stale", "job_id": job_id},
            )
            return
        job_metrics = metrics.for_job(*label)
        job_metrics.failed.inc()
        if outcome == "retry":
            job_metrics.retried.inc()
            log.info(
                "job %s will retry in %.3fs",
                job_id,
                delay_ms / 1000,
                extra={"event": "job_retry", "job_id": job_id},
            )
        else:
            job_metrics.dead.inc()
            log.warning(
                "job %s dead-lettered", job_id, extra={"event": "job_dead", "job_id": job_id}
            )

    async def flush(self, within: float) -> bool:
        """Wait until everything buffered has been sent, for at most ``within`` seconds;
        False if something is still unsent."""
        if not self.pending:
            return True
        self._ready.set()
        try:
            await asyncio.wait_for(self._idle.wait(), within)
        except TimeoutError:
            return False
        return True

    async def close(self, within: float) -> None:
        """Wait until everything buffered has been sent, for at most ``within`` seconds."""
        if not await self.flush(within):
            log.error(
                "exiting with %d outcomes unreported; their leases will expire and the "
                "jobs run again",
                self.pending,
                extra={"event": "report_abandoned"},
            )
