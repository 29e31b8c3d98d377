"""How enqueue packs jobs into script calls: runs of shared options, at most BATCH_LIMIT a call."""

from __future__ import annotations

from conveyor.job import JobSpec
from conveyor.queue import BATCH_LIMIT, _batches

SPEC_FIELDS = 13


def test_jobs_sharing_their_options_travel_as_one_run() -> None:
    specs = [JobSpec("t", {"i": i}, dedup_key=f"k{i}") for i in range(3)]
    (batch,) = _batches(specs, 1024)
    template = list(specs[0].template())
    assert batch.args == [
        *(1, *template, 3, 1),
        *(b'{"i":0}', "k0", b'{"i":1}', "k1", b'{"i":2}', "k2"),
    ]
    assert batch.labels == [("t", "normal")] * 3


def test_a_run_without_dedup_keys_sends_one_value_per_job() -> None:
    specs = [JobSpec("t", i) for i in range(3)]
    (batch,) = _batches(specs, 1024)
    assert batch.args == [1, *specs[0].template(), 3, 0, b"0", b"1", b"2"]
    # One key in a run is enough for every job of it to carry one ('' for none).
    (keyed,) = _batches([*specs, JobSpec("t", 3, dedup_key="k")], 1024)
    assert keyed.args == [1, *specs[0].template(), 4, 1, b"0", "", b"1", "", b"2", "", b"3", "k"]


def test_a_change_of_options_starts_a_new_run_and_keeps_job_order() -> None:
    specs = [
        JobSpec("t", 1),
        JobSpec("t", 2, priority="low"),
        JobSpec("t", 3, priority="low"),
        JobSpec("t", 4),
    ]
    (batch,) = _batches(specs, 1024)
    assert batch.args[0] == 3
    runs, pos = [], 1
    while pos < len(batch.args):
        template, count = batch.args[pos : pos + SPEC_FIELDS], batch.args[pos + SPEC_FIELDS]
        assert batch.args[pos + SPEC_FIELDS + 1] == 0  # no dedup keys: payloads only
        pos += SPEC_FIELDS + 2
        payloads = batch.args[pos : pos + count]
        pos += count
        runs.append((template[2], payloads))
    assert runs == [("normal", [b"1"]), ("low", [b"2", b"3"]), ("normal", [b"4"])]


def test_more_than_the_batch_limit_is_split_into_separate_calls() -> None:
    specs = [JobSpec("t", i) for i in range(BATCH_LIMIT + 1)]
    batches = _batches(specs, 1024)
    assert [len(b.labels) for b in batches] == [BATCH_LIMIT, 1]
    # Each call carries its own run header: the count is per call, not per stream of specs.
    assert batches[0].args[0] == 1
    assert batches[0].args[1 + SPEC_FIELDS] == BATCH_LIMIT
    assert batches[1].args[:1] == [1]
    assert batches[1].args[1 + SPEC_FIELDS] == 1
