"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against a
real Redis, a real ``conveyor worker`` and ``conveyor dashboard``, all on loopback.

Screenshots go to ``test-artifacts/``; the live-update lag (enqueue to the page showing it) is
printed and written to ``test-artifacts/dashboard-lag.txt``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx2
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from conveyor.local import free_port
from conveyor.queue import Queue
from tests.support.workers import REPO_ROOT, Workers, children_of, wait_until

pytest_plugins = ["tests.support.worker_fixtures"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-test-token-0123456789"
ARTIFACTS = REPO_ROOT / "test-artifacts"
LAG_SAMPLES = 5
MAX_LAG = 1.0
CLOSE_TIMEOUT = 30


@pytest.fixture
def dashboard(redis_url: str, queue_name: str, tmp_path: Path) -> Iterator[str]:
    """``conveyor dashboard`` as a subprocess on a free loopback port, without PostgreSQL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.pop("DATABASE_URL", None)
    env.update(
        REDIS_URL=redis_url,
        CONVEYOR_QUEUE=queue_name,
        CONVEYOR_DASHBOARD_TOKEN=TOKEN,
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / "dashboard.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "dashboard", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx2.get(f"{base}/login", timeout=1).status_code == 200
        except httpx2.TransportError:
            return process.poll() is not None  # exited: stop waiting, the assert below says so

    try:
        wait_until(answers, 20, "the dashboard to answer", interval=0.1)
        assert process.poll() is None, log_path.read_text()
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        print("----- dashboard log -----")
        print(log_path.read_text(errors="replace")[-5000:])


@pytest.fixture
def page() -> Iterator[Page]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/bootstrap.sh installs Debian's chromium")
    before = set(children_of(os.getpid()))
    with tempfile.TemporaryDirectory(prefix="conveyor-chromium-") as profile:
        playwright = sync_playwright().start()
        # Playwright's driver (which runs chromium) is this process's new child.
        driver = set(children_of(os.getpid())) - before
        # Closing waits on the driver without a deadline; a wedged one is killed instead of
        # holding the suite until pytest-timeout fires.
        watchdog = threading.Timer(CLOSE_TIMEOUT, _kill_trees, [driver])
        try:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 1000},
            )
        except BaseException:
            playwright.stop()
            raise
        try:
            yield context.new_page()
        finally:
            watchdog.start()
            try:
                context.close()
                playwright.stop()
            finally:
                watchdog.cancel()


def _kill_trees(pids: Iterable[int]) -> None:
    for pid in pids:
        _kill_trees(children_of(pid))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def shoot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# Records, in the page, when the "enqueued" count of the high class first shows each value.
WATCH_QUEUED = """() => {
  window.seenQueued = {};
  const read = () => {
    const cell = document.querySelector('td[data-class="high"][data-field="queued"]');
    const value = cell ? cell.textContent : null;
    if (value !== null && !(value in window.seenQueued)) window.seenQueued[value] = Date.now();
  };
  new MutationObserver(read).observe(document.querySelector('#classes tbody'),
    {childList: true, subtree: true, characterData: true});
  read();
}"""


def cell(page: Page, priority: str, field: str) -> str:
    return page.locator(f'td[data-class="{priority}"][data-field="{field}"]').inner_text()


def test_the_dashboard_follows_a_real_worker_live_and_replays_a_dead_letter(
    dashboard: str, workers: Workers, queue: Queue, page: Page
) -> None:
    workers.start()

    # Logging in: the page sends the browser to the form first.
    page.goto(dashboard)
    expect(page).to_have_url(f"{dashboard}/login")
    page.fill("#token", "not the token, clearly")
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text("not right")
    page.fill("#token", TOKEN)
    shoot(page, "dashboard-login")
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{dashboard}/")
    # From here on the page must work without a script error or a failed request (the wrong
    # token's 401 above is one the browser reports too).
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.reload()
    expect(page.locator("#live")).to_have_text("live")
    expect(page.locator("#worker-count")).to_have_text("1 live", timeout=10_000)
    expect(page.locator('td[data-class="high"][data-field="queued"]')).to_have_text("0")

    # Counts change live as jobs are enqueued and processed; each enqueue's lag is measured
    # from just before the call to the moment the page's count showed it.
    page.evaluate(WATCH_QUEUED)
    lags = []
    for n in range(1, LAG_SAMPLES + 1):
        before = time.time()
        queue.enqueue("noop", priority="high")
        page.wait_for_function(f"() => '{n}' in window.seenQueued", timeout=5_000)
        lags.append(page.evaluate(f"() => window.seenQueued['{n}']") / 1000 - before)
        time.sleep(0.2)
    expect(page.locator('td[data-class="high"][data-field="completed"]')).to_have_text(
        str(LAG_SAMPLES), timeout=10_000
    )
    report = (
        f"live-update lag over {LAG_SAMPLES} enqueues: median {statistics.median(lags):.3f}s, "
        f"max {max(lags):.3f}s ({', '.join(f'{lag:.3f}' for lag in lags)})"
    )
    print(report)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "dashboard-lag.txt").write_text(report + "\n")
    assert statistics.median(lags) < MAX_LAG, report
    shoot(page, "dashboard-live")

    # A job that times out on its only attempt is dead-lettered; replayed from the page it
    # runs again, this time briefly (``drainable`` sleeps ``later_seconds`` on a second run).
    doomed = queue.enqueue(
        "drainable",
        {"seconds": 5, "later_seconds": 0.05},
        priority="normal",
        timeout=0.5,
        max_attempts=1,
    ).id
    row = page.locator(f'#dlq tr[data-job="{doomed}"]')
    expect(row).to_be_visible(timeout=10_000)
    expect(row).to_contain_text("timeout")
    shoot(page, "dashboard-dead-letter")
    row.locator("button.replay").click()
    expect(page.locator("#dlq-status")).to_contain_text("replayed: 1")
    expect(row).to_have_count(0)
    finished = page.locator("#recent li.kind-completed", has_text=doomed)
    expect(finished).to_have_count(1, timeout=10_000)
    wait_until(lambda: queue.stats()[2].backlog == 0, 5, "the replayed job to leave the queue")

    # The job panel: Redis has forgotten the finished job, and without PostgreSQL the history
    # says it is unavailable.
    finished.locator("a.job-link").click()
    expect(page.locator("#history-unavailable")).to_contain_text("without DATABASE_URL")

    # Pause and resume a group from the page.
    page.fill("#pause-form input[name=group]", "tenant-7")
    page.click("#pause-form button")
    paused = page.locator("#paused tbody tr", has_text="tenant-7")
    expect(paused).to_have_count(1)
    assert queue.paused_groups() == {"tenant-7"}
    shoot(page, "dashboard-replayed")
    paused.locator("button").click()
    expect(paused).to_have_count(0)
    assert queue.paused_groups() == set()

    assert errors == []
