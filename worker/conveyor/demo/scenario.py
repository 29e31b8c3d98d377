"""The busy hour: which jobs arrive when, and when the workers are broken.

Everything is drawn from a seeded random generator, so two runs of the same size play the same
hour. ``scale`` multiplies every job count (1.0 is the full hour: 3,000 welcome emails);
``duration`` is the seconds over which traffic arrives, the drain coming after it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from conveyor.job import Backoff, JobSpec

SEND_EMAIL = "send_welcome_email"
DELIVER_WEBHOOK = "deliver_webhook"
EXPORT_CSV = "export_orders_csv"
RENDER_PDF = "render_invoice_pdf"
PRIORITY_OF = {
    SEND_EMAIL: "critical",
    DELIVER_WEBHOOK: "high",
    EXPORT_CSV: "normal",
    RENDER_PDF: "low",
}

TRAFFIC_END = 0.8
"""Fraction of ``duration`` after which nothing new arrives."""
DEFAULT_LIMIT = 20
"""Jobs per second any customer group may start, unless its plan says otherwise."""
CRON_REPEAT = 2.0
"""Seconds after the billing run at which its cron fires again."""


@dataclass(frozen=True)
class Customer:
    name: str
    plan: str
    accounts: int
    """Sub-accounts with orders in the dataset; one export covers one account."""
    weight: float
    """Share of the routine webhook and export traffic."""
    limit: int
    """Jobs per second the customer's groups may start."""


CUSTOMERS = (
    Customer("acme", "enterprise", 2000, 0.35, 400),
    Customer("globex", "business", 200, 0.15, DEFAULT_LIMIT),
    Customer("umbrella", "business", 200, 0.15, DEFAULT_LIMIT),
    Customer("hooli", "business", 200, 0.15, DEFAULT_LIMIT),
    Customer("stark", "business", 200, 0.12, DEFAULT_LIMIT),
    Customer("initech", "free", 100, 0.08, 2),
)


def webhook_group(customer: str) -> str:
    """Webhooks get their own group per customer: a slow export queue must not hold them."""
    return f"{customer}-webhooks"


@dataclass(frozen=True, order=True)
class Arrival:
    at: float
    """Seconds from the start of the hour."""
    seq: int
    spec: JobSpec = field(compare=False)


@dataclass(frozen=True, order=True)
class Moment:
    at: float
    kind: str
    """``note`` (shown as is), ``kill`` (kill -9 a worker) or ``terminate`` (SIGTERM one)."""
    text: str = ""


@dataclass
class Scenario:
    duration: float
    scale: float
    arrivals: list[Arrival]
    moments: list[Moment]

    @property
    def planned(self) -> Counter[str]:
        """Distinct jobs per job type (duplicate enqueues share a dedup key)."""
        keys = {(a.spec.type, a.spec.dedup_key) for a in self.arrivals}
        return Counter(job_type for job_type, _ in keys)

    @property
    def duplicates(self) -> int:
        return len(self.arrivals) - sum(self.planned.values())


class _Builder:
    def __init__(self, duration: float, scale: float, seed: int) -> None:
        self.duration = duration
        self.scale = scale
        self.rng = random.Random(seed)
        self.arrivals: list[Arrival] = []
        self.moments: list[Moment] = []

    def count(self, full_hour: int) -> int:
        return max(1, round(full_hour * self.scale))

    def at(self, fraction: float) -> float:
        return fraction * self.duration

    def traffic_time(self) -> float:
        return self.rng.uniform(0, TRAFFIC_END * self.duration)

    def add(self, at: float, spec: JobSpec, duplicate_rate: float = 0.0) -> None:
        self.arrivals.append(Arrival(at, len(self.arrivals), spec))
        if self.rng.random() < duplicate_rate:
            again = min(at + self.rng.uniform(0.05, 2.0), TRAFFIC_END * self.duration)
            self.arrivals.append(Arrival(again, len(self.arrivals), spec))

    def customer(self) -> Customer:
        return self.rng.choices(CUSTOMERS, weights=[c.weight for c in CUSTOMERS])[0]

    def note(self, fraction: float, text: str) -> None:
        self.moments.append(Moment(self.at(fraction), "note", text))


def _signups(b: _Builder) -> None:
    """Welcome emails: a steady trickle of signups, and a spike when a newsletter goes out."""
    n = b.count(3000)
    spike = n // 4
    for user in range(n):
        at = b.rng.uniform(b.at(0.55), b.at(0.65)) if user < spike else b.traffic_time()
        spec = JobSpec(
            SEND_EMAIL,
            {"user": user, "to": f"user{user}@signup.example", "name": f"User {user}"},
            priority="critical",
            max_attempts=5,
            timeout=30,
            dedup_key=f"welcome:{user}",
            backoff=Backoff(0.2, 2.0),
        )
        b.add(at, spec, duplicate_rate=0.04)  # a double-clicked signup button
    b.note(0.55, f"newsletter out: {spike:,} signups within {b.at(0.1):.0f}s (critical)")


def _webhooks(b: _Builder) -> None:
    """Event deliveries; a few hooks point at endpoints that always fail or are gone."""
    n = b.count(1800)
    picks = b.rng.sample(range(n), min(n, max(2, round(n * 0.03))))
    gone = set(picks[: max(1, len(picks) // 3)])
    broken = set(picks) - gone
    for i in range(n):
        customer = b.customer().name
        endpoint = "gone" if i in gone else "broken" if i in broken else "ok"
        spec = JobSpec(
            DELIVER_WEBHOOK,
            {"event": f"evt_{i}", "customer": customer, "endpoint": endpoint},
            priority="high",
            group=webhook_group(customer),
            max_attempts=5,
            timeout=20,
            dedup_key=f"event:evt_{i}",
            backoff=Backoff(0.25, 3.0),
        )
        b.add(b.traffic_time(), spec, duplicate_rate=0.03)  # the producer re-sent the event


def _export(customer: Customer, account: int, key: str) -> JobSpec:
    return JobSpec(
        EXPORT_CSV,
        {"customer": customer.name, "account": account % customer.accounts},
        priority="normal",
        group=customer.name,
        timeout=60,
        dedup_key=key,
    )


def _exports(b: _Builder) -> None:
    """Routine exports from every customer, a free-plan burst, and acme's bulk export."""
    for i in range(b.count(600)):
        customer = b.customer()
        account = b.rng.randrange(customer.accounts)
        b.add(b.traffic_time(), _export(customer, account, f"export:{i}"), duplicate_rate=0.03)
    initech = next(c for c in CUSTOMERS if c.name == "initech")
    burst = b.count(80)
    for account in range(burst):
        b.add(b.at(0.2), _export(initech, account, f"export:initech:{account}:bulk"))
    b.note(0.2, f"initech (free plan, {initech.limit} jobs/s) asks for {burst} exports")
    acme = CUSTOMERS[0]
    burst = b.count(2000)
    for account in range(burst):
        b.add(b.at(0.3), _export(acme, account, f"export:acme:{account}:bulk"))
    b.note(0.3, f"acme exports all {burst:,} of its accounts at once (normal)")


def _invoices(b: _Builder) -> None:
    """The billing run renders a PDF per invoice; its cron fires twice."""
    run = b.count(1500)
    trickle = b.count(300)
    for n in range(run + trickle):
        at = b.at(0.1) if n < run else b.traffic_time()
        spec = JobSpec(
            RENDER_PDF,
            {"invoice": n, "customer": b.customer().name, "lines": b.rng.randint(15, 60)},
            priority="low",
            timeout=120,
            dedup_key=f"invoice:{n}",
        )
        b.add(at, spec)
        if n < b.count(100):
            b.add(b.at(0.1) + CRON_REPEAT, spec)
    b.note(0.1, f"billing run: {run:,} invoice PDFs queued at once (low)")
    b.moments.append(
        Moment(
            b.at(0.1) + CRON_REPEAT, "note", "the billing cron fires twice: repeats deduplicated"
        )
    )


def build(duration: float = 150.0, scale: float = 1.0, seed: int = 2024) -> Scenario:
    b = _Builder(duration, scale, seed)
    b.note(0.0, "signups, webhooks, exports and invoices start arriving")
    _signups(b)
    _webhooks(b)
    _exports(b)
    _invoices(b)
    # Each while the general pool is busiest: rendering the billing run, exporting for acme.
    b.moments.append(Moment(b.at(0.15), "kill"))
    b.moments.append(Moment(b.at(0.32), "terminate"))
    b.note(TRAFFIC_END, "traffic stops; the workers drain what is left")
    return Scenario(duration, scale, sorted(b.arrivals), sorted(b.moments))
