"""What the tests read out of README.md, so that its examples stay true."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_schedules(tmp_path: Path) -> Path:
    """The YAML example of the README's "Recurring jobs" section, as a file."""
    section = README.read_text().split("## Recurring jobs", 1)[1]
    example = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert example is not None, "no YAML example under 'Recurring jobs' in README.md"
    path = tmp_path / "schedules.yaml"
    path.write_text(example.group(1))
    return path
