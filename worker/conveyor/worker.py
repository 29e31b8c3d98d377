"""One worker process: claim, run, report, heartbeat, recover, drain.

The process runs an asyncio loop with a few long-lived tasks: the claimer leases jobs in
batches while slots are free and otherwise blocks on the queue's wake-up lists; every job runs
in its own task; the reporter sends acks and failures in batches; the heartbeat extends the
leases of running jobs; the sweeper recovers expired leases of any worker. SIGTERM starts a
drain: claiming stops at once, running jobs get ``grace`` seconds, the rest are handed back
with their attempt refunded. A sync handler that outlives its timeout cannot be stopped inside
the process, so the process exits with ``EXIT_RECYCLE`` and the supervisor replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import redis.asyncio

from conveyor import metrics
from conveyor.config import WorkerSettings
from conveyor.connection import connect_async
from conveyor.errors import BackendUnavailable, ConveyorError
from conveyor.execution import LEASE_LOST, SHUTDOWN, TIMEOUT, Poison, failure_of, prepare
from conveyor.job import Job
from conveyor.keys import PRIORITY_CLASSES, Keyspace
from conveyor.leases import Ack, Claimed, ClaimResult, Failure, LeaseClient
from conveyor.registry import Registry
from conveyor.reporting import Labels, Outage, Reporter
from conveyor.workers import WorkerRecord

log = logging.getLogger(__name__)

WATCHDOG_INTERVAL = 0.05
"""Seconds between timeout checks: the precision of job timeouts."""
EXIT_RECYCLE = 75
"""Exit code asking the supervisor for a fresh process (a sync handler could not be stopped)."""
NO_ACKS: tuple[list[Ack], list[Labels]] = ([], [])


@dataclass(eq=False)
class Running:
    claimed: Claimed
    started: float
    task: asyncio.Task[None] | None = None
    thread: Future[None] | None = None
    stop_reason: str | None = None
    labels: tuple[str, str] = ("", "")
    deadline: float = 0.0
    """Event-loop time at which the run times out; 0 until the handler starts."""


@dataclass
class _Backoff:
    """Reconnect pacing: exponential with full jitter, so a Redis outage costs no CPU."""

    base: float = 0.1
    cap: float = 5.0
    failures: int = field(default=0)

    def next_delay(self) -> float:
        self.failures += 1
        return random.uniform(0, min(self.cap, self.base * 2**self.failures))


class Worker:
    def __init__(self, settings: WorkerSettings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.keys = Keyspace(settings.queue)
        self.identity = f"{settings.identity}"
        self.redis = connect_async(
            settings.redis_url,
            socket_timeout=10,
            socket_connect_timeout=5,
            socket_keepalive=True,
            health_check_interval=30,
        )
        # Blocking waits get their own connection: cancelling one on shutdown drops that
        # connection, which must not be a connection the reporter is using.
        self.blocking = connect_async(
            settings.redis_url,
            socket_connect_timeout=5,
            socket_keepalive=True,
            socket_timeout=settings.sweep_interval + 10,
        )
        self.leases = LeaseClient(self.redis, self.keys)
        self.outage = Outage()
        self.reporter = Reporter(self.leases, self.outage)
        self.record = WorkerRecord(self.redis, self.keys, self.identity, settings)
        self.running: dict[str, Running] = {}
        self.held: deque[tuple[Running, int]] = deque()
        self._cautious = False
        self._waiting_id: int | None = None
        """Redis client id of the connection blocked waiting for work, while it waits."""
        self._wait_refused = False
        self._problem_logged = False
        self.draining = asyncio.Event()
        self.closing = asyncio.Event()
        self.hurry = asyncio.Event()
        self.slot_free = asyncio.Event()
        self.exit_code = 0
        self.threads = ThreadPoolExecutor(settings.concurrency * 2, "conveyor-job")
        self._claims = 0
        self._ttl_ms = round(settings.lease_ttl * 1000)
        self._wake_keys = [self.keys.wake(c) for c in settings.classes]

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        metrics.SLOTS_TOTAL.set(self.settings.concurrency)
        log.info(
            "worker %s started: queue=%s classes=%s concurrency=%d",
            self.identity,
            self.settings.queue,
            ",".join(self.settings.classes),
            self.settings.concurrency,
            extra={"event": "worker_started"},
        )
        background = [
            asyncio.create_task(self.reporter.run(), name="reporter"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._sweep_loop(), name="sweeper"),
            asyncio.create_task(self._watchdog_loop(), name="watchdog"),
        ]
        if self.settings.database_url:
            from conveyor.history.writer import writer_for

            background.append(asyncio.create_task(writer_for(self.settings).run(), name="history"))
        from conveyor.schedule import Scheduler, configured_schedules

        if schedules := configured_schedules(self.settings.schedules):
            scheduler = Scheduler(self.redis, self.keys, schedules)
            background.append(asyncio.create_task(scheduler.run(), name="scheduler"))
        claimer = asyncio.create_task(self._claim_loop(), name="claimer")
        claimer.add_done_callback(self._claimer_ended)
        await self.draining.wait()
        claimer.cancel()
        await asyncio.gather(claimer, return_exceptions=True)
        await self._drain()
        await self._stop_background(background)
        await self.record.remove()
        await self.redis.aclose()
        await self.blocking.aclose()
        log.info("worker %s stopped", self.identity, extra={"event": "worker_stopped"})
        return self.exit_code

    async def _stop_background(self, background: list[asyncio.Task[None]]) -> None:
        # The heartbeat and the sweeper stop at their next turn instead of being cancelled
        # mid-command: redis-py (seen with 8.2) can absorb a cancellation that arrives while
        # other tasks share its pool, and a loop that lives on keeps the process from exiting.
        self.closing.set()
        loops = [t for t in background if t.get_name() in ("heartbeat", "sweeper", "watchdog")]
        await asyncio.wait(loops, timeout=5)
        for t in background:
            t.cancel()
        await asyncio.wait(background, timeout=5)

    def _claimer_ended(self, claimer: asyncio.Task[None]) -> None:
        """A claimer that dies of a bug would leave a live process that never claims again:
        drain and exit non-zero instead, so the supervisor starts a fresh one."""
        if claimer.cancelled() or claimer.exception() is None or self.draining.is_set():
            return
        log.error(
            "claiming stopped on an unexpected error; restarting the process",
            exc_info=claimer.exception(),
            extra={"event": "claimer_crashed"},
        )
        self.exit_code = 1
        self.stop()

    def stop(self) -> None:
        """First call: drain. Second call: hand back everything now."""
        if self.draining.is_set():
            log.warning(
                "second stop signal: handing back running jobs now",
                extra={"event": "drain_hurried"},
            )
            self.hurry.set()
            return
        log.info(
            "drain started: %d running, grace %.1fs",
            len(self.running),
            self.settings.grace,
            extra={"event": "drain_started"},
        )
        metrics.DRAINING.set(1)
        self.draining.set()

    async def _drain(self) -> None:
        pending = {r.task for r in self.running.values() if r.task is not None}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.grace
        hurry = asyncio.create_task(self.hurry.wait())
        while pending and not self.hurry.is_set() and loop.time() < deadline:
            await asyncio.wait(
                {*pending, hurry},
                timeout=deadline - loop.time(),
                return_when=asyncio.FIRST_COMPLETED,
            )
            pending = {t for t in pending if not t.done()}
        hurry.cancel()
        leftover = list(self.running.values())
        for r in leftover:
            self._interrupt(r, SHUTDOWN)
        await asyncio.gather(*(r.task for r in leftover if r.task), return_exceptions=True)
        if leftover:
            self.reporter.hand_back(
                [(r.claimed.id, r.claimed.token) for r in leftover],
                [(r.claimed.type or "", r.claimed.priority) for r in leftover],
            )
            log.info(
                "handed back %d unfinished jobs",
                len(leftover),
                extra={"event": "drain_handed_back"},
            )
        await self.reporter.close(within=max(5.0, self.settings.grace))

    # -- claiming ------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        backoff = _Backoff()
        while not self.draining.is_set():
            if self.held:
                # A job whose last run died with its process (a poison suspect) waits until
                # nothing else runs, then runs alone; nothing new is claimed meanwhile.
                if len(self.running) == len(self.held):
                    self._start_held()
                if len(self.running) > len(self.held):  # a job runs; its end wakes this loop
                    self.slot_free.clear()
                    await self.slot_free.wait()
                continue
            wanted = self._wanted()
            if wanted <= 0:
                self.slot_free.clear()
                await self.slot_free.wait()
                continue
            # Taken here, not inside the claim's task: the reporter gives this loop one turn
            # to pick up the acks of the jobs that just freed these slots.
            acks = self.reporter.take_acks()
            claim = asyncio.ensure_future(
                self.leases.claim(*self._claim_args(wanted), acks=acks[0])
            )
            try:
                result: ClaimResult | None = await asyncio.shield(claim)
            except asyncio.CancelledError:
                await self._hand_back_claim(claim, acks)
                raise
            except BackendUnavailable as exc:
                self.reporter.put_back_acks(*acks)
                self.outage.failed("claim", exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            except ConveyorError as exc:
                self.reporter.put_back_acks(*acks)
                # Redis answered with an error (out of memory, busy script): retry like an
                # outage rather than stop claiming.
                if backoff.failures == 0:
                    log.warning(
                        "claim refused by Redis, retrying with backoff: %s",
                        exc,
                        extra={"event": "claim_failed"},
                    )
                await asyncio.sleep(backoff.next_delay())
                continue
            except BaseException:
                # Not a refusal (a bug): the claimer ends, and its acks must not end with it.
                self.reporter.put_back_acks(*acks)
                raise
            if result is not None:
                self.reporter.acked(*acks, result.stale_acks)
            self.outage.succeeded()
            backoff.failures = 0
            # While claims come back short the queue is drained: wait for work and claim in
            # one round trip, until a claim fills its batch or something else needs the loop.
            while result is not None:
                self._claim_problem(result)
                await self._take(result)
                if len(result.jobs) >= wanted or self.draining.is_set() or self.held:
                    break
                wanted = self._wanted()
                if wanted <= 0:
                    break
                # Let the jobs just started reach their handlers before the next wait is
                # packed and sent: that send would otherwise sit in front of every pickup.
                await asyncio.sleep(0)
                result = await self._wait_then_claim(result, wanted)

    def _claim_problem(self, result: ClaimResult) -> None:
        """Log what stopped a claim early, once until a claim runs clean. The claim loop goes
        on as usual: a short claim leads to the paced wait, never to an immediate retry."""
        if not result.problem:
            self._problem_logged = False
            return
        if not self._problem_logged:
            log.warning(
                "claim stopped early by a key of another type under the queue's names "
                "(written by something other than Conveyor?): %s",
                result.problem[:300],
                extra={"event": "claim_problem"},
            )
            self._problem_logged = True

    def _wanted(self) -> int:
        free = self.settings.concurrency - len(self.running)
        # Right after a poison suspect, claim one job at a time: several suspects in one
        # batch would have to be handed back to run alone one after another.
        return min(free, 1 if self._cautious else self.settings.claim_batch)

    def _claim_args(self, wanted: int) -> tuple[int, int, str, tuple[str, ...]]:
        self._claims += 1
        return wanted, self._ttl_ms, f"{self.identity}/{self._claims}", self.settings.classes

    async def _take(self, result: ClaimResult) -> None:
        """Start the jobs of a claim (or hold the poison suspects among them)."""
        for claimed in result.jobs:
            if claimed.alone:
                self._hold(claimed, result.now_ms)
            else:
                self._start(claimed, result.now_ms)
        self._cautious = any(claimed.alone for claimed in result.jobs)
        _count_started(result.jobs)
        # Sampled here and by the heartbeat rather than moved per job: two metric writes
        # per job were a tenth of a no-op job's cost.
        metrics.SLOTS_BUSY.set(len(self.running))
        if len(self.held) > 1:
            await self._hand_back_held_but_one()

    async def _hand_back_claim(
        self, claim: Awaitable[ClaimResult | None], acks: tuple[list[Ack], list[Labels]] = NO_ACKS
    ) -> None:
        """A drain stopped the claimer while its claim was in flight. Redis may have leased
        jobs to it already; cutting the reply off would leave them to expire as lost runs
        (an attempt spent and ``lease_ttl`` of delay), so wait for it and hand them back.
        The acks it carried are settled too, or go back to the reporter."""
        try:
            result = await claim
        except ConveyorError:
            self.reporter.put_back_acks(*acks)
            return
        except BaseException:
            self.reporter.put_back_acks(*acks)
            raise
        if result is not None:
            self.reporter.acked(*acks, result.stale_acks)
        if result is not None and result.jobs:
            self.reporter.hand_back(
                [(c.id, c.token) for c in result.jobs],
                [(c.type or "", c.priority) for c in result.jobs],
            )

    async def _wait_then_claim(self, previous: ClaimResult, wanted: int) -> ClaimResult | None:
        """None when the wait failed (Redis unreachable: the caller's plain claim takes over,
        with its backoff) or Redis had lost Conveyor's functions."""
        timeout = self.settings.sweep_interval
        if previous.next_ms >= 0:
            timeout = min(timeout, max(0.001, (previous.next_ms - previous.now_ms) / 1000))
        exchange = asyncio.ensure_future(
            self.leases.wait_then_claim(
                self.blocking, self._wake_keys, timeout, self._claim_args(wanted), self._waiting
            )
        )
        try:
            result = await asyncio.shield(exchange)
            self._wait_refused = False
            return result
        except asyncio.CancelledError:
            # A drain: end the wait at once, then give back whatever the claim leased.
            if self._waiting_id is not None:
                with contextlib.suppress(ConveyorError, redis.RedisError, OSError):
                    await self.redis.client_unblock(self._waiting_id)
            await self._hand_back_claim(exchange)
            raise
        except BackendUnavailable as exc:
            self.outage.failed("wait for work", exc)
            await asyncio.sleep(min(timeout, 1.0))
            return None
        except ConveyorError as exc:
            # Redis refuses the wait itself (a wake-up key of the wrong type, CLIENT renamed
            # away): claiming goes on at the sweep pace, with one warning until it recovers.
            if not self._wait_refused:
                log.warning(
                    "waiting for work refused by Redis, polling instead: %s",
                    exc,
                    extra={"event": "wait_refused"},
                )
            self._wait_refused = True
            await asyncio.sleep(min(timeout, 1.0))
            return None

    def _waiting(self, client_id: int | None) -> None:
        self._waiting_id = client_id

    # -- running -------------------------------------------------------------------------------

    def _start(self, claimed: Claimed, now_ms: int) -> None:
        running = Running(claimed, time.monotonic())
        self.running[claimed.id] = running
        running.task = asyncio.create_task(self._execute(running, now_ms))

    def _hold(self, claimed: Claimed, now_ms: int) -> None:
        """Keep a leased job (heartbeats extend it, a drain hands it back) until it can run
        alone: if it kills the process again, it takes no other job with it."""
        running = Running(claimed, 0.0)
        self.running[claimed.id] = running
        self.held.append((running, now_ms))

    async def _hand_back_held_but_one(self) -> None:
        """Suspects wait their turn in Redis, not in this process: if the one that runs next
        kills it, the others would be charged an attempt for a run they never had."""
        keep = self.held.popleft()
        returned = [running for running, _ in self.held]
        self.held = deque([keep])
        for running in returned:
            del self.running[running.claimed.id]
        self.reporter.hand_back(
            [(r.claimed.id, r.claimed.token) for r in returned],
            [(r.claimed.type or "", r.claimed.priority) for r in returned],
        )
        await self.reporter.flush(within=self.settings.lease_ttl)

    def _start_held(self) -> None:
        while self.held:
            running, now_ms = self.held.popleft()
            if running.stop_reason is not None:  # its lease was lost while it waited
                del self.running[running.claimed.id]
                continue
            log.info(
                "job %s runs alone: its last run died with its worker process",
                running.claimed.id,
                extra={"event": "job_alone", "job_id": running.claimed.id},
            )
            running.started = time.monotonic()
            running.task = asyncio.create_task(self._execute(running, now_ms))
            return

    def _interrupt(self, running: Running, reason: str) -> None:
        if running.stop_reason is None:
            running.stop_reason = reason
            if running.task is not None and not running.task.done():
                running.task.cancel(reason)

    async def _execute(self, running: Running, now_ms: int) -> None:
        claimed = running.claimed
        try:
            try:
                prepared = prepare(claimed, self.registry)
            except Poison as poison:
                self._poisoned(claimed, poison)
                return
            labels = (claimed.type or "", claimed.priority)
            running.labels = labels
            job_metrics = metrics.for_job(*labels)
            if claimed.queued_ms:
                job_metrics.wait.observe(max(0, now_ms - claimed.queued_ms) / 1000)
            # The watchdog loop enforces this; one timer handle per job cost more than the job.
            running.deadline = asyncio.get_running_loop().time() + prepared.job.timeout
            try:
                if prepared.task.is_async:
                    await prepared.task.handler(prepared.job)  # type: ignore[misc]
                else:
                    handler = cast(Callable[[Job], None], prepared.task.handler)
                    running.thread = self.threads.submit(handler, prepared.job)
                    await asyncio.wrap_future(running.thread)
            except asyncio.CancelledError:
                if running.stop_reason == TIMEOUT:
                    self._timed_out(running)
                elif running.stop_reason is None:
                    raise
            except Exception as exc:  # noqa: BLE001 - any handler error is the job's failure
                self._failed(running, failure_of(claimed, prepared.task, exc))
            else:
                if running.stop_reason is None:
                    runtime = time.monotonic() - running.started
                    job_metrics.run.observe(runtime)
                    self.reporter.ack(claimed.id, claimed.token, round(runtime * 1000), labels)
                    log.debug("job %s done in %.3fs", claimed.id, runtime)
            finally:
                running.deadline = 0.0
        finally:
            if running.stop_reason != SHUTDOWN:
                del self.running[claimed.id]
                self.slot_free.set()

    def _poisoned(self, claimed: Claimed, poison: Poison) -> None:
        log.error(
            "job %s (%s) dead-lettered as %s: %s",
            claimed.id,
            claimed.type,
            poison.reason,
            poison,
            extra={"event": "job_poison", "job_id": claimed.id},
        )
        metrics.JOBS_POISON.labels(poison.reason).inc()
        self.reporter.fail(
            Failure(claimed.id, claimed.token, poison.reason, str(poison), permanent=True),
            (claimed.type or "", claimed.priority),
        )

    def _failed(self, running: Running, failure: Failure) -> None:
        log.info(
            "job %s (%s) attempt %d failed: %s",
            running.claimed.id,
            running.claimed.type,
            running.claimed.attempt,
            failure.message.strip().splitlines()[-1][:200],
            extra={"event": "job_failed", "job_id": running.claimed.id},
        )
        self.reporter.fail(failure, running.labels)

    def _timed_out(self, running: Running) -> None:
        claimed = running.claimed
        log.warning(
            "job %s (%s) timed out after %.1fs",
            claimed.id,
            claimed.type,
            claimed.timeout_ms / 1000,
            extra={"event": "job_timeout", "job_id": claimed.id},
        )
        self.reporter.fail(
            Failure(
                claimed.id,
                claimed.token,
                "timeout",
                f"attempt exceeded its {claimed.timeout_ms / 1000:g}s timeout",
            ),
            running.labels,
        )
        if running.thread is not None and not running.thread.done():
            asyncio.get_running_loop().create_task(self._reap_thread(running))

    async def _reap_thread(self, running: Running) -> None:
        """Give a timed-out sync handler ``kill_grace`` seconds, then recycle the process."""
        assert running.thread is not None
        try:
            await asyncio.wait_for(asyncio.wrap_future(running.thread), self.settings.kill_grace)
        except (TimeoutError, Exception):  # noqa: BLE001 - only whether it stopped matters
            if not running.thread.done():
                log.error(
                    "sync handler of job %s ignores its timeout; recycling the process",
                    running.claimed.id,
                    extra={"event": "worker_recycle"},
                )
                self.exit_code = EXIT_RECYCLE
                self.hurry.set()
                self.stop()

    # -- keeping leases and the queue healthy ----------------------------------------------------

    async def _closing_within(self, seconds: float) -> bool:
        """Sleep ``seconds``; True at once if the worker is closing."""
        try:
            await asyncio.wait_for(self.closing.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _heartbeat_loop(self) -> None:
        refused = False  # Redis answered with an error: warned once until a beat succeeds
        while not await self._closing_within(self.settings.heartbeat_interval):
            leases = [
                (r.claimed.id, r.claimed.token)
                for r in self.running.values()
                if r.stop_reason is None
            ]
            try:
                if leases:
                    for job_id in await self.leases.extend(leases, self._ttl_ms):
                        self._lease_lost(job_id)
                await self.record.beat(
                    len(self.running), self.draining.is_set(), list(self.running)
                )
                metrics.SLOTS_BUSY.set(len(self.running))
            except BackendUnavailable as exc:
                self.outage.failed("heartbeat", exc)
            except ConveyorError as exc:
                if not refused:
                    log.warning("heartbeat failed: %s", exc, extra={"event": "heartbeat_failed"})
                refused = True
            else:
                self.outage.succeeded()
                refused = False

    def _lease_lost(self, job_id: str) -> None:
        running = self.running.get(job_id)
        if running is None:
            return
        log.warning(
            "lease of job %s lost (expired and recovered elsewhere); abandoning run",
            job_id,
            extra={"event": "lease_lost", "job_id": job_id},
        )
        metrics.for_job(*running.labels).lost.inc()
        self._interrupt(running, LEASE_LOST)

    async def _watchdog_loop(self) -> None:
        """Stops runs past their timeout, checked every WATCHDOG_INTERVAL seconds."""
        loop = asyncio.get_running_loop()
        while not await self._closing_within(WATCHDOG_INTERVAL):
            now = loop.time()
            for running in list(self.running.values()):
                if running.deadline and now >= running.deadline:
                    self._interrupt(running, TIMEOUT)

    async def _sweep_loop(self) -> None:
        while not await self._closing_within(
            self.settings.sweep_interval * random.uniform(0.8, 1.2)
        ):
            try:
                recovered, _ = await self.leases.recover(PRIORITY_CLASSES)
            except ConveyorError as exc:
                log.debug("sweep failed: %s", exc)
                continue
            if recovered:
                metrics.JOBS_RECOVERED.inc(recovered)
                log.warning(
                    "recovered %d expired leases", recovered, extra={"event": "leases_recovered"}
                )


def _count_started(jobs: list[Claimed]) -> None:
    """One counter write per job type and class of a claim, not one per job."""
    for (job_type, priority), n in Counter((c.type or "", c.priority) for c in jobs).items():
        metrics.for_job(job_type, priority).started.inc(n)


def run_worker(settings: WorkerSettings, registry: Registry) -> int:
    """Run one worker process to completion; returns its exit code."""
    worker = Worker(settings, registry)
    try:
        return asyncio.run(worker.run())
    finally:
        worker.threads.shutdown(wait=False, cancel_futures=True)


def exit_now(code: int) -> None:
    """Leave without joining handler threads that ignored their timeout."""
    logging.shutdown()
    os._exit(code)
