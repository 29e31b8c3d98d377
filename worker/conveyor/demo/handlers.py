"""The demo's job handlers, run by ``conveyor worker conveyor.demo.handlers``.

Each does real work against the services ``conveyor demo`` started (an SMTP server, a webhook
endpoint, PostgreSQL, a directory for files) and appends every attempt it finishes to the
ledger before returning. They are sync handlers, as most application code is: the worker runs
them in threads.
"""

from __future__ import annotations

import csv
import functools
import random
import smtplib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import orjson
from fpdf import FPDF

from conveyor.demo import env, ledger
from conveyor.demo.dataset import EXPORT_COLUMNS, Connections, export_query
from conveyor.demo.scenario import DELIVER_WEBHOOK, EXPORT_CSV, RENDER_PDF, SEND_EMAIL
from conveyor.errors import PermanentError, RetryableError
from conveyor.job import Job
from conveyor.registry import task

# Proxies from the environment must never see these requests: the endpoint is on loopback.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _ledgered(body: Callable[[Job], dict[str, Any]]) -> Callable[[Job], None]:
    """Record the attempt's outcome in the ledger, then return or re-raise."""

    @functools.wraps(body)
    def run(job: Job) -> None:
        settings = env.current()
        keys = ledger.LedgerKeys(settings.run)
        started = time.time()
        try:
            detail = body(job)
        except Exception as exc:
            ledger.record(settings.redis_url, keys, job, started, False, error=type(exc).__name__)
            raise
        ledger.record(settings.redis_url, keys, job, started, True, **detail)

    return run


@task(SEND_EMAIL)
@_ledgered
def send_welcome_email(job: Job) -> dict[str, Any]:
    to, name = job.payload["to"], job.payload["name"]
    message = EmailMessage()
    message["From"] = "Conveyor Demo <welcome@conveyor-demo.example>"
    message["To"] = to
    message["Subject"] = f"Welcome aboard, {name}"
    message["Message-ID"] = f"<{job.id}.{job.attempt}@conveyor-demo.example>"
    message.set_content(f"Hello {name},\n\nyour account is ready.\n")
    _send_mail(message, env.current().smtp_port)
    return {}


_smtp = threading.local()


def _send_mail(message: EmailMessage, port: int) -> None:
    """Send over this thread's SMTP connection, as an application keeps one open to its relay
    rather than paying a connection and greeting per message."""
    for fresh in (False, True):
        conn: smtplib.SMTP | None = None if fresh else getattr(_smtp, "conn", None)
        if conn is None:
            conn = smtplib.SMTP("127.0.0.1", port, timeout=10)
            _smtp.conn = conn
        try:
            conn.send_message(message)
            return
        except smtplib.SMTPServerDisconnected:
            # The relay closed an idle connection: open a new one, once.
            _smtp.conn = None
            if fresh:
                raise
        except OSError:
            _smtp.conn = None
            conn.close()
            raise


@task(DELIVER_WEBHOOK)
@_ledgered
def deliver_webhook(job: Job) -> dict[str, Any]:
    p = job.payload
    url = f"{env.current().webhook_url}/{p['customer']}/{p['endpoint']}/{p['event']}"
    body = orjson.dumps({"id": p["event"], "type": "order.created", "attempt": job.attempt})
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with _opener.open(request, timeout=5) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 410:
            raise PermanentError(f"endpoint gone: HTTP 410 for {p['event']}") from exc
        raise RetryableError(f"endpoint answered HTTP {exc.code} for {p['event']}") from exc
    return {"status": status}


@functools.cache
def _connections(url: str) -> Connections:
    return Connections(url)


@task(EXPORT_CSV)
@_ledgered
def export_orders_csv(job: Job) -> dict[str, Any]:
    settings = env.current()
    customer, account = job.payload["customer"], int(job.payload["account"])
    with _connections(settings.database_url).connection() as conn:
        rows = conn.execute(export_query(settings.schema), (customer, account)).fetchall()
    path = Path(settings.output_dir, "exports", f"{customer}-{account:04d}-{job.id}.csv")
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(EXPORT_COLUMNS)
        writer.writerows(rows)
    return {"rows": len(rows)}


@task(RENDER_PDF)
@_ledgered
def render_invoice_pdf(job: Job) -> dict[str, Any]:
    p = job.payload
    invoice = int(p["invoice"])
    prices = random.Random(invoice)
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(0, 12, f"Invoice INV-{invoice:06d}", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=10)
    pdf.cell(0, 8, f"Customer: {p['customer']}", new_x="LMARGIN", new_y="NEXT")
    total = 0
    for line in range(int(p["lines"])):
        quantity, cents = prices.randint(1, 9), prices.randint(100, 50_000)
        total += quantity * cents
        pdf.cell(110, 6, f"SKU-{prices.randint(1, 500):03d} service line {line + 1}", border=1)
        pdf.cell(20, 6, str(quantity), border=1, align="R")
        pdf.cell(
            40,
            6,
            f"{quantity * cents / 100:,.2f} EUR",
            border=1,
            align="R",
            new_x="LMARGIN",
            new_y="NEXT",
        )
    pdf.set_font("Helvetica", "B", 11)
    pdf.cell(170, 8, f"Total {total / 100:,.2f} EUR", align="R")
    path = Path(env.current().output_dir, "invoices", f"INV-{invoice:06d}.pdf")
    pdf.output(str(path))
    return {"pages": int(pdf.page_no())}
