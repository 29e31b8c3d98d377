"""B12, B23: jobs that break the worker's own machinery (exceptions that cannot be printed or
encoded, payloads mutated by their handler, records that cannot be decoded) end as ordinary
failures or dead letters; the worker process carries on running everything else."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from redis.typing import EncodableT, FieldT

from conveyor.job import Backoff
from conveyor.keys import Keyspace
from conveyor.queue import Queue
from tests.support.workers import Ledger, Workers, assert_conserved, wait_until

pytest_plugins = ["tests.support.worker_fixtures"]


def _gaps(rows: list[dict[str, Any]]) -> list[float]:
    return [b["t_start"] - a["t_start"] for a, b in itertools.pairwise(rows)]


@pytest.mark.parametrize("kind", ["unprintable", "unencodable"])
def test_an_exception_whose_text_cannot_be_printed_or_encoded_is_retried_at_backoff_pace(
    kind: str, workers: Workers, tracked: Queue, job_ledger: Ledger
) -> None:
    worker = workers.start()
    process = worker.child()
    job_id = tracked.enqueue(
        "bad_exception", {"kind": kind}, backoff=Backoff(base=0.5, cap=10, jitter=False)
    ).id
    others = [r.id for r in tracked.enqueue_batch("noop", ({"i": i} for i in range(5)))]

    wait_until(lambda: tracked.get_job(job_id).state == "dead", 15, "the dead letter")

    runs = job_ledger.rows(job_id=job_id)
    assert [r["attempt"] for r in runs] == [1, 2, 3]
    gaps = _gaps(runs)
    assert gaps[0] >= 0.5
    assert gaps[1] >= 1.0
    info = tracked.get_job(job_id)
    assert (info.dead_reason, info.attempts, len(info.errors)) == ("error", 3, 3)
    wait_until(lambda: all(tracked.get_job(j).state == "done" for j in others), 5, "the others")
    # The failure reached Redis as such: nothing waited for a lease to expire.
    assert sorted(r["job_id"] for r in job_ledger.rows(outcome="ok")) == sorted(others)
    assert not worker.logs(event="leases_recovered")
    assert worker.child() == process, "the worker process was replaced"
    assert_conserved(tracked.client, tracked.keys.queue, [job_id, *others])


def test_a_handler_that_mutates_its_payload_is_retried_with_the_original_payload(
    workers: Workers, tracked: Queue, job_ledger: Ledger
) -> None:
    worker = workers.start()
    process = worker.child()
    payload = {"n": 1, "items": [1, 2], "text": "unchanged"}
    job_id = tracked.enqueue(
        "mutate_and_fail", payload, backoff=Backoff(base=0.3, cap=10, jitter=False)
    ).id

    wait_until(lambda: tracked.get_job(job_id).state == "dead", 15, "the dead letter")

    runs = job_ledger.rows(job_id=job_id)
    assert [r["payload"] for r in runs] == [payload] * 3
    gaps = _gaps(runs)
    assert gaps[0] >= 0.3
    assert gaps[1] >= 0.6
    info = tracked.get_job(job_id)
    assert info.payload == orjson.dumps(payload)
    assert (info.dead_reason, info.attempts) == ("error", 3)
    assert worker.child() == process


BAD_JOBS: dict[str, tuple[dict[str, str | bytes], str]] = {
    "bad-json": ({"t": "noop", "p": b"\xff{not json"}, "decode_error"),
    "no-type": ({"p": b"{}"}, "invalid_job"),
    "unknown-type": ({"t": "no_such_type", "p": b"{}"}, "unknown_job_type"),
    "schema-99": ({"t": "noop", "p": b"{}", "v": "99"}, "invalid_job"),
}


def _write_ready(queue: Queue, jobs: dict[str, dict[str, str | bytes]]) -> None:
    """Put job records straight into the ready structures, bypassing every validation."""
    keys: Keyspace = queue.keys
    seconds, micros = queue.client.time()
    now_ms = seconds * 1000 + micros // 1000
    pipe = queue.client.pipeline(transaction=True)
    for job_id, fields in jobs.items():
        record: dict[FieldT, EncodableT] = {"v": "1", "c": "normal", "ct": now_ms, "s": "queued"}
        record.update(fields)
        pipe.hset(keys.job(job_id), mapping=record)
        pipe.rpush(keys.group("normal", ""), job_id)
        pipe.hincrby(keys.counts, "ready:normal", 1)
    pipe.zadd(keys.ready("normal"), {"": now_ms}, nx=True)
    pipe.rpush(keys.wake("normal"), "1")
    pipe.execute()


def test_jobs_that_cannot_be_decoded_are_dead_lettered_once_and_the_worker_keeps_running(
    workers: Workers, tracked: Queue, job_ledger: Ledger
) -> None:
    worker = workers.start()
    process = worker.child()
    _write_ready(tracked, {job_id: fields for job_id, (fields, _) in BAD_JOBS.items()})
    good = [r.id for r in tracked.enqueue_batch("noop", ({"i": i} for i in range(10)))]

    wait_until(lambda: len(list(tracked.dead_letters())) == 4, 10, "four dead letters")
    wait_until(lambda: all(tracked.get_job(j).state == "done" for j in good), 10, "good jobs")

    dead = {info.id: info for info in tracked.dead_letters()}
    assert {j: info.dead_reason for j, info in dead.items()} == {
        j: reason for j, (_, reason) in BAD_JOBS.items()
    }
    for job_id, (fields, _) in BAD_JOBS.items():
        assert dead[job_id].payload == fields["p"], "the raw bytes were not kept"
        assert dead[job_id].attempts == 1, "a poison job was retried"
    assert sorted(r["job_id"] for r in job_ledger.rows()) == sorted(good)
    errors = worker.logs(level="ERROR")
    assert sorted(str(e.get("job_id")) for e in errors) == sorted(BAD_JOBS)
    assert worker.child() == process
    assert not worker.logs(event="process_died")
    assert_conserved(tracked.client, tracked.keys.queue, [*BAD_JOBS, *good])


def test_a_record_holding_neither_type_nor_payload_is_dead_lettered_not_dropped(
    workers: Workers, tracked: Queue
) -> None:
    workers.start()
    _write_ready(tracked, {"bare": {}})
    good = tracked.enqueue("noop", {}).id
    wait_until(lambda: tracked.get_job(good).state == "done", 10, "the good job")

    wait_until(lambda: tracked.get_job("bare").state == "dead", 3, "the bare record's dead letter")
    assert tracked.get_job("bare").dead_reason == "invalid_job"
    assert_conserved(tracked.client, tracked.keys.queue, ["bare", good])


def test_a_foreign_job_whose_id_is_not_utf8_runs_and_is_acknowledged(
    workers: Workers, tracked: Queue, job_ledger: Ledger
) -> None:
    """A client in another language may write ids in any encoding: the worker keeps the id's
    bytes as they are, so the run is acknowledged against the right record."""
    worker = workers.start()
    process = worker.child()
    job_id = b"foreign-\xff\xfe"
    keys = tracked.keys
    seconds, micros = tracked.client.time()
    now_ms = seconds * 1000 + micros // 1000
    pipe = tracked.client.pipeline(transaction=True)
    pipe.hset(
        keys.job("").encode() + job_id,
        mapping={"v": "1", "t": "noop", "p": b"{}", "c": "normal", "ct": now_ms, "s": "queued"},
    )
    pipe.rpush(keys.group("normal", ""), job_id)
    pipe.hincrby(keys.counts, "ready:normal", 1)
    pipe.zadd(keys.ready("normal"), {"": now_ms}, nx=True)
    pipe.rpush(keys.wake("normal"), "1")
    pipe.execute()
    good = tracked.enqueue("noop", {}).id

    wait_until(lambda: len(job_ledger.rows()) == 2, 10, "both jobs to run")
    wait_until(
        lambda: tracked.client.hget(keys.job("").encode() + job_id, "s") == b"done",
        5,
        "the foreign job's ack",
    )
    assert tracked.get_job(good).state == "done"
    assert worker.child() == process
    assert not worker.logs(event="claimer_crashed")


def test_a_record_whose_attempt_count_is_not_a_number_is_still_run(
    workers: Workers, tracked: Queue, job_ledger: Ledger
) -> None:
    """'inf' and 'nan' parse as numbers in Lua: taken as they are, they broke the claim's
    event after its pops, so those jobs vanished and every later claim failed."""
    worker = workers.start()
    _write_ready(
        tracked,
        {
            "inf-attempts": {"t": "noop", "p": b"{}", "a": "inf"},
            "nan": {"t": "noop", "p": b"{}", "a": "nan"},
        },
    )
    good = tracked.enqueue("noop", {}).id
    wait_until(lambda: tracked.get_job(good).state == "done", 10, "the good job")
    wait_until(lambda: len(job_ledger.rows()) == 3, 10, "all three jobs to run")
    assert not worker.logs(event="wait_refused")
    assert not worker.logs(event="claim_failed")
    assert_conserved(tracked.client, tracked.keys.queue, ["inf-attempts", "nan", good])


def test_a_foreign_key_in_one_class_leaves_the_others_running_with_one_warning(
    workers: Workers, tracked: Queue, job_ledger: Ledger
) -> None:
    """Something else rewrote the low class's ready set as a string: every claim meets it. The
    worker keeps running the other classes, promptly, and says so once (not once per claim)."""
    tracked.client.set(tracked.keys.ready("low"), "not a zset")
    worker = workers.start(concurrency=4)
    ids = [r.id for r in tracked.enqueue_batch("noop", ({"i": i} for i in range(20)))]
    job_ledger.wait_rows(len(ids), timeout=10, outcome="ok")
    # An idle worker still picks up new work at once.
    late = tracked.enqueue("noop", {"late": True}, priority="critical").id
    job_ledger.wait_rows(1, timeout=2, job_id=late)

    problems = worker.logs(event="claim_problem")
    assert len(problems) == 1
    assert "WRONGTYPE" in problems[0]["message"]
    assert not worker.logs(event="claimer_crashed")
    tracked.client.delete(tracked.keys.ready("low"))
    assert_conserved(tracked.client, tracked.keys.queue, [*ids, late])
