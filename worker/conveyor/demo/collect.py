"""Turning the end state of a run into the report's numbers and checks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import redis

from conveyor.demo import ledger
from conveyor.demo.accounting import (
    Produced,
    Spread,
    Tally,
    busiest_rate,
    job_records,
    spread_by,
    tally,
)
from conveyor.demo.fleet import Harm
from conveyor.demo.report import Check, CustomerRow, Result
from conveyor.demo.scenario import (
    CUSTOMERS,
    DELIVER_WEBHOOK,
    EXPORT_CSV,
    RENDER_PDF,
    SEND_EMAIL,
    Scenario,
)
from conveyor.demo.services import MailServer, WebhookEndpoint
from conveyor.keys import Keyspace


@dataclass
class Run:
    """Everything a finished run leaves behind to be counted."""

    scenario: Scenario
    client: redis.Redis
    keys: Keyspace
    ledger_keys: ledger.LedgerKeys
    produced: Produced
    mail: MailServer
    webhooks: WebhookEndpoint
    output_dir: Path
    harms: list[Harm]
    peak_ready: dict[str, int]
    elapsed: float


def _ids_of(produced: Produced, job_type: str) -> list[str]:
    return [i for i, spec in produced.accepted.items() if spec.type == job_type]


def _service_checks(run: Run, t: Tally) -> list[Check]:
    produced = run.produced
    emails = _ids_of(produced, SEND_EMAIL)
    received = run.mail.recipients()
    hooks = _ids_of(produced, DELIVER_WEBHOOK)
    done_hooks = [i for i in hooks if i in t.completed_ids]
    events = {produced.accepted[i].payload["event"] for i in hooks}
    pdfs = [p for p in (run.output_dir / "invoices").glob("*.pdf") if _is_pdf(p)]
    return [
        Check(
            "welcome emails received by the SMTP server (distinct recipients)",
            len(emails),
            sum(produced.accepted[i].payload["to"] in received for i in emails),
        ),
        Check(
            "webhook events the endpoint acknowledged = webhook jobs completed",
            len(done_hooks),
            sum(1 for e in run.webhooks.delivered if e in events),
        ),
        Check(
            "webhook dead letters = hooks aimed at broken or gone endpoints",
            sum(produced.accepted[i].payload["endpoint"] != "ok" for i in hooks),
            sum(n for (job_type, _), n in t.dead_reasons.items() if job_type == DELIVER_WEBHOOK),
        ),
        Check(
            "invoice PDFs on disk = PDF jobs completed",
            sum(1 for i in _ids_of(produced, RENDER_PDF) if i in t.completed_ids),
            len(pdfs),
        ),
        Check(
            "CSV files on disk = export jobs completed",
            sum(1 for i in _ids_of(produced, EXPORT_CSV) if i in t.completed_ids),
            sum(1 for _ in (run.output_dir / "exports").glob("*.csv")),
        ),
    ]


def _is_pdf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(5) == b"%PDF-"


def _customers(run: Run, t: Tally, entries: list[ledger.Entry]) -> list[CustomerRow]:
    rows = []
    for c in CUSTOMERS:
        exports = [
            i for i, s in run.produced.accepted.items()
            if s.type == EXPORT_CSV and s.group == c.name
        ]  # fmt: skip
        runs = [e for e in entries if e.type == EXPORT_CSV and e.group == c.name]
        hooks = [
            i for i, s in run.produced.accepted.items()
            if s.type == DELIVER_WEBHOOK and s.payload["customer"] == c.name
        ]  # fmt: skip
        rows.append(
            CustomerRow(
                name=c.name,
                plan=c.plan,
                limit=c.limit,
                exports=len(exports),
                export_wait=Spread.of(e.wait for e in runs),
                export_rate=busiest_rate(runs),
                webhooks_delivered=sum(1 for i in hooks if i in t.completed_ids),
                webhooks_dead=sum(1 for i in hooks if i in t.dead_ids),
            )
        )
    return rows


def collect(run: Run) -> Result:
    entries = list(ledger.read(run.client, run.ledger_keys))
    records = job_records(run.client, run.keys, run.produced.accepted)
    t = tally(run.produced, records, entries)
    pending = sum(x.pending for x in t.types)
    checks = [
        Check("accepted jobs still pending at the end", 0, pending),
        Check(
            "jobs Conveyor marks done without a completed run in the ledger",
            0,
            sum(1 for i, r in records.items() if r.state == "done" and i not in t.completed_ids),
        ),
        *_service_checks(run, t),
        Check("lost jobs (accepted - completed - dead-lettered)", 0, t.lost),
    ]
    emails = len(_ids_of(run.produced, SEND_EMAIL))
    resent = run.mail.messages - len(run.mail.recipients())
    redelivered = sum(run.webhooks.delivered.values()) - len(run.webhooks.delivered)
    notes = [
        f"the SMTP server received {run.mail.messages:,} messages for {emails:,} welcome emails"
        + _again(resent),
        f"the webhook endpoint answered {_statuses(run.webhooks.statuses)}" + _again(redelivered),
        "attempts the killed worker's supervisor gave back (worker_lost) and run again: "
        f"{t.failed_attempts['worker_lost']}",
    ]
    return Result(
        duration=run.scenario.duration,
        scale=run.scenario.scale,
        elapsed=run.elapsed,
        tally=t,
        waits=spread_by(entries, lambda e: e.priority, lambda e: e.wait),
        runtimes=spread_by(entries, lambda e: e.priority, lambda e: e.runtime),
        peak_ready=run.peak_ready,
        customers=_customers(run, t, entries),
        harms=run.harms,
        checks=checks,
        notes=notes,
    )


def _again(n: int) -> str:
    if not n:
        return ""
    return (
        f"; {n} of them repeated by a run whose worker died before its ack reached Redis "
        "(delivery is at least once)"
    )


def _statuses(statuses: Counter[int]) -> str:
    return ", ".join(f"{n:,} x HTTP {code}" for code, n in sorted(statuses.items()))
