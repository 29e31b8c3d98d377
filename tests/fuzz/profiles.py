"""Hypothesis profiles of the fuzz package (see ``tests/fuzz/__init__.py``).

The profiles are applied per test through ``fuzz()`` rather than loaded globally, so choosing
one here never changes the settings of Hypothesis tests in other tiers.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings

PROFILE_ENV = "HYPOTHESIS_PROFILE"

# CI explores the same examples every run, so a red run always means a change broke
# something; the long profile draws fresh ones, to hunt.
settings.register_profile(
    "fuzz-ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz-long",
    parent=settings.get_profile("fuzz-ci"),
    max_examples=1000,
    derandomize=False,
)


def fuzz(scale: float = 1.0, **overrides: Any) -> settings:
    """The active profile's settings for one test; ``scale`` multiplies its example budget
    (a test whose examples each start real work runs fewer than a pure one)."""
    name = "fuzz-long" if os.environ.get(PROFILE_ENV) == "long" else "fuzz-ci"
    base = settings.get_profile(name)
    return settings(base, max_examples=max(1, round(base.max_examples * scale)), **overrides)
