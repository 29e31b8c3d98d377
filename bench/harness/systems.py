"""The systems under test and how each one's throwaway environment is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
DRIVERS_DIR = BENCH_DIR / "drivers"
REPO_DIR = BENCH_DIR.parent
CACHE_DIR = Path.home() / ".cache" / "conveyor-bench"
ENVS_DIR = CACHE_DIR / "envs"
NODE_DIR = CACHE_DIR / "node"


@dataclass(frozen=True)
class System:
    """One column of the comparison.

    `kind` decides how the environment is made: "venv" (pip into a private virtualenv),
    "node" (npm into the shared node prefix) or "repo" (an interpreter that already exists,
    used for Conveyor itself so it is measured exactly as installed in the repository).
    """

    name: str
    label: str
    kind: str
    driver: Path
    requirements: tuple[str, ...] = ()
    interpreter: Path | None = None
    # "Fastest Python peer" in the ratios is taken over these only (not Conveyor, not BullMQ).
    python_peer: bool = True
    # Extra environment for the driver, e.g. to select a documented tuned configuration
    # for a second column of the same system.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def env_dir(self) -> Path:
        return NODE_DIR if self.kind == "node" else ENVS_DIR / self.name


# Exact pins keep the figures comparable from one run to the next; bump them deliberately.
# hiredis goes into every Python env because Conveyor ships with redis[hiredis] and
# redis-py picks it up automatically, so no peer is handicapped by the pure-Python parser.
SYSTEMS: tuple[System, ...] = (
    System(
        name="conveyor",
        label="Conveyor",
        kind="repo",
        driver=DRIVERS_DIR / "conveyor_driver.py",
        interpreter=REPO_DIR / ".venv" / "bin" / "python",
        python_peer=False,
    ),
    System(
        name="conveyor-tuned",
        label="Conveyor (tuned)",
        kind="repo",
        driver=DRIVERS_DIR / "conveyor_driver.py",
        interpreter=REPO_DIR / ".venv" / "bin" / "python",
        python_peer=False,
        env={"CONVEYOR_BENCH_PROFILE": "tuned"},
    ),
    System(
        name="rq",
        label="RQ",
        kind="venv",
        driver=DRIVERS_DIR / "rq_driver.py",
        requirements=("rq==3.0.0", "redis==8.2.0", "hiredis==3.5.0"),
    ),
    System(
        name="dramatiq",
        label="Dramatiq",
        kind="venv",
        driver=DRIVERS_DIR / "dramatiq_driver.py",
        requirements=("dramatiq[redis]==2.2.1", "redis==8.2.0", "hiredis==3.5.0"),
    ),
    System(
        name="celery",
        label="Celery",
        kind="venv",
        driver=DRIVERS_DIR / "celery_driver.py",
        requirements=("celery[redis]==5.7.0", "hiredis==3.5.0"),
    ),
    System(
        name="arq",
        label="arq",
        kind="venv",
        driver=DRIVERS_DIR / "arq_driver.py",
        requirements=("arq==0.28.0", "hiredis==3.5.0"),
    ),
    System(
        name="saq",
        label="SAQ",
        kind="venv",
        driver=DRIVERS_DIR / "saq_driver.py",
        # saq 0.26.4 imports typing_extensions without declaring it as a dependency.
        requirements=("saq[redis,hiredis]==0.26.4", "typing_extensions==4.15.0"),
    ),
    System(
        name="taskiq",
        label="taskiq",
        kind="venv",
        driver=DRIVERS_DIR / "taskiq_driver.py",
        requirements=("taskiq==0.13.0", "taskiq-redis==1.2.4", "hiredis==3.5.0"),
    ),
    System(
        name="bullmq",
        label="BullMQ (Node)",
        kind="node",
        driver=DRIVERS_DIR / "bullmq_driver.mjs",
        # ioredis is an optional peer of bullmq 6 (several Redis clients are supported) but
        # it is the default one; 6.0.0 is the version bullmq itself is tested against.
        requirements=("bullmq@6.7.6", "ioredis@6.0.0"),
        python_peer=False,
    ),
)


def by_name(names: list[str]) -> list[System]:
    known = {s.name: s for s in SYSTEMS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown system(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]
