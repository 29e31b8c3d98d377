"""Property-based fuzzing of every way bad input reaches Conveyor (issue 3, section 4).

Four surfaces, one module each: job records written straight into Redis by a broken producer
or a foreign client (``test_worker_records``), ``JobSpec`` and ``Queue`` options
(``test_job_options``), the ``conveyor`` command line (``test_cli``) and the TaskQueue custom
resource's spec (``test_taskqueue_spec``). Each property is the same promise seen from a
different side: bad input yields a clear, typed error or a dead letter with a reason, never a
crashed worker, a traceback, a raw Redis error or a lost or half-written job.

Every test runs under a named Hypothesis profile (``tests.fuzz.profiles.fuzz``):

- ``ci`` (the default): a bounded, derandomized set of examples per test (the same every run,
  so a red run means a change broke something), under a minute on a loaded 2-core machine.
- ``long``: ten times the examples, freshly drawn each run, for hunting; select it with
  ``HYPOTHESIS_PROFILE=long``,
  e.g. ``HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/fuzz``.

A failing example Hypothesis finds is kept as an ``@example`` on its test, with the bug it
exposed named beside it, so every fixed bug stays a regression test.
"""
