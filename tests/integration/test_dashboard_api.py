"""The dashboard's pages and API against a real Redis: login, CSRF and origin checks, actions."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from conveyor.dashboard import DashboardSettings, create_app
from conveyor.dashboard.auth import COOKIE
from conveyor.dashboard.lookup import NO_DATABASE
from conveyor.errors import ConfigError
from conveyor.queue import Queue
from tests.support.scripted import ScriptedWorker

TOKEN = "integration-token-0123456789"
ORIGIN = "http://testserver"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def app_client(redis_url: str, queue: Queue) -> Iterator[TestClient]:
    settings = DashboardSettings(
        token=TOKEN, redis_url=redis_url, queue=queue.keys.queue, poll_interval=0.2
    )
    with TestClient(create_app(settings), base_url=ORIGIN) as client:
        yield client


def log_in(client: TestClient) -> str:
    """Log in through the form; returns the page's CSRF token."""
    answer = client.post("/login", data={"token": TOKEN}, headers={"Origin": ORIGIN})
    assert answer.status_code == 200, answer.text  # the redirect to / was followed
    found = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', answer.text)
    assert found, answer.text[:500]
    return found[1]


def dead_letters(queue: Queue, redis_url: str, n: int, **options: Any) -> list[str]:
    """n jobs failed permanently by a scripted worker."""
    job_type = options.pop("job_type", "email")
    reason = options.pop("reason", "error")
    ids = [e.id for e in queue.enqueue_batch(job_type, range(n), **options)]
    worker = ScriptedWorker(redis_url, queue.keys)
    claimed = worker.claim(n, classes=None).jobs
    assert {c.id for c in claimed} == set(ids)
    worker.fail(*claimed, reason=reason, permanent=True)
    return ids


def state(queue: Queue, job_id: str) -> str:
    return queue.get_job(job_id).state


def test_settings_refuse_a_missing_or_short_token(redis_url: str) -> None:
    with pytest.raises(ConfigError, match="CONVEYOR_DASHBOARD_TOKEN"):
        DashboardSettings(token="", redis_url=redis_url)
    with pytest.raises(ConfigError):
        DashboardSettings(token="short", redis_url=redis_url)


def test_nothing_is_served_without_the_token(app_client: TestClient) -> None:
    page = app_client.get("/", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/login"
    for path in ("/api/overview", "/api/events", "/api/dead-letters", "/api/jobs/x"):
        assert app_client.get(path).status_code == 401, path
        wrong = app_client.get(path, headers={"Authorization": "Bearer not-the-token-at-all"})
        assert wrong.status_code == 401, path
    for path in ("/api/dead-letters/replay", "/api/groups/pause"):
        answer = app_client.post(path, json={"ids": ["1"]}, headers={"Origin": ORIGIN})
        assert answer.status_code == 401, path
    assert app_client.get("/api/overview", headers=BEARER).status_code == 200


def test_login_sets_an_httponly_strict_session_cookie(app_client: TestClient) -> None:
    wrong = app_client.post("/login", data={"token": "x" * 30}, headers={"Origin": ORIGIN})
    assert wrong.status_code == 401
    assert "not right" in wrong.text
    assert COOKIE not in app_client.cookies

    answer = app_client.post(
        "/login", data={"token": TOKEN}, headers={"Origin": ORIGIN}, follow_redirects=False
    )
    assert answer.status_code == 303
    cookie = answer.headers["set-cookie"].lower()
    assert cookie.startswith(f"{COOKIE}=")
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "content-security-policy" in answer.headers

    page = app_client.get("/")
    assert page.status_code == 200
    assert 'name="csrf-token"' in page.text
    assert app_client.get("/api/overview").status_code == 200


def test_a_tampered_session_cookie_is_refused(app_client: TestClient) -> None:
    log_in(app_client)
    value = app_client.cookies[COOKIE]
    expires, nonce, signature = value.split(".")
    app_client.cookies.clear()
    app_client.cookies.set(COOKIE, value)
    assert app_client.get("/api/overview").status_code == 200
    app_client.cookies.set(COOKIE, f"{int(expires) + 3600}.{nonce}.{signature}")
    assert app_client.get("/api/overview").status_code == 401


def test_session_actions_need_the_csrf_token_and_the_dashboard_origin(
    app_client: TestClient, queue: Queue, redis_url: str
) -> None:
    csrf = log_in(app_client)
    [job_id] = dead_letters(queue, redis_url, 1)
    body = {"ids": [job_id]}
    refused = [
        {"Origin": ORIGIN},
        {"Origin": ORIGIN, "X-CSRF-Token": "0" * 64},
        {"Origin": "http://evil.example", "X-CSRF-Token": csrf},
        {"Origin": "null", "X-CSRF-Token": csrf},
        {"Referer": "http://evil.example/page", "X-CSRF-Token": csrf},
        {"X-CSRF-Token": csrf},
    ]
    for headers in refused:
        answer = app_client.post("/api/dead-letters/replay", json=body, headers=headers)
        assert answer.status_code == 403, headers
        assert state(queue, job_id) == "dead"

    answer = app_client.post(
        "/api/dead-letters/replay",
        json=body,
        headers={"Referer": f"{ORIGIN}/", "X-CSRF-Token": csrf},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"replayed": 1, "missing": [], "skipped": 0}
    assert state(queue, job_id) == "queued"


def test_bearer_clients_act_without_csrf_but_never_from_a_foreign_origin(
    app_client: TestClient, queue: Queue
) -> None:
    foreign = app_client.post(
        "/api/groups/pause",
        json={"group": "acme"},
        headers={**BEARER, "Origin": "http://evil.example"},
    )
    assert foreign.status_code == 403
    assert queue.paused_groups() == set()

    answer = app_client.post("/api/groups/pause", json={"group": "acme"}, headers=BEARER)
    assert answer.status_code == 200
    assert queue.paused_groups() == {"acme"}


def test_actions_take_a_json_body_only(app_client: TestClient) -> None:
    form = app_client.post("/api/groups/pause", data={"group": "acme"}, headers=BEARER)
    assert form.status_code == 415
    bad = app_client.post("/api/dead-letters/replay", json={"ids": "1"}, headers=BEARER)
    assert bad.status_code == 400


def test_replay_sends_dead_letters_back_to_ready(
    app_client: TestClient, queue: Queue, redis_url: str
) -> None:
    email = dead_letters(queue, redis_url, 2, group="a")
    sms = dead_letters(queue, redis_url, 1, job_type="sms", group="b")

    answer = app_client.post("/api/dead-letters/replay", json={"ids": email[:1]}, headers=BEARER)
    assert answer.json()["replayed"] == 1
    assert [state(queue, i) for i in (*email, *sms)] == ["queued", "dead", "dead"]

    answer = app_client.post(
        "/api/dead-letters/replay",
        json={"all": True, "filters": {"type": "sms"}},
        headers=BEARER,
    )
    assert answer.json()["replayed"] == 1
    assert [state(queue, i) for i in (*email, *sms)] == ["queued", "dead", "queued"]
    again = app_client.post("/api/dead-letters/replay", json={"ids": sms}, headers=BEARER)
    assert again.json() == {"replayed": 0, "missing": [], "skipped": 1}


def test_purge_deletes_only_the_named_dead_letters(
    app_client: TestClient, queue: Queue, redis_url: str
) -> None:
    doomed, kept = dead_letters(queue, redis_url, 2)
    alive = queue.enqueue("alive").id

    answer = app_client.post(
        "/api/dead-letters/purge", json={"ids": [doomed, alive]}, headers=BEARER
    )
    assert answer.json() == {"purged": 1, "skipped": 1}
    listed = app_client.get("/api/dead-letters", headers=BEARER).json()["dead_letters"]
    assert [j["id"] for j in listed] == [kept]
    assert state(queue, alive) == "queued"


def test_dead_letters_are_listed_with_filters(
    app_client: TestClient, queue: Queue, redis_url: str
) -> None:
    email_a = dead_letters(queue, redis_url, 2, group="a")
    sms_b = dead_letters(queue, redis_url, 1, job_type="sms", group="b", reason="timeout")

    def listed(**params: str) -> list[str]:
        answer = app_client.get("/api/dead-letters", params=params, headers=BEARER)
        assert answer.status_code == 200, answer.text
        return [j["id"] for j in answer.json()["dead_letters"]]

    assert listed() == [*email_a, *sms_b]
    assert listed(type="sms") == sms_b
    assert listed(group="a") == email_a
    assert listed(reason="timeout") == sms_b
    assert listed(limit="1") == email_a[:1]
    assert listed(since="4102444800") == []  # 2100-01-01
    record = app_client.get("/api/dead-letters", headers=BEARER).json()["dead_letters"][0]
    assert record["payload"] == 0
    assert record["dead_reason"] == "error"


def test_pause_and_resume_a_group(app_client: TestClient, queue: Queue) -> None:
    app_client.post("/api/groups/pause", json={"group": "tenant/7"}, headers=BEARER)
    assert queue.paused_groups() == {"tenant/7"}
    overview = app_client.get("/api/overview", headers=BEARER)
    assert overview.status_code == 200
    app_client.post("/api/groups/resume", json={"group": "tenant/7"}, headers=BEARER)
    assert queue.paused_groups() == set()


def test_job_panel_without_postgres_says_history_is_unavailable(
    app_client: TestClient, queue: Queue, redis_url: str
) -> None:
    [job_id] = dead_letters(queue, redis_url, 1)
    answer = app_client.get(f"/api/jobs/{job_id}", headers=BEARER)
    assert answer.status_code == 200
    panel = answer.json()
    assert panel["job"]["state"] == "dead"
    assert panel["job"]["errors"][0]["reason"] == "error"
    assert panel["history"] == {"available": False, "reason": NO_DATABASE}
    # Redis forgets finished jobs; with no history to ask, the panel cannot say more than that.
    unknown = app_client.get("/api/jobs/no-such-job", headers=BEARER)
    assert unknown.status_code == 200
    assert unknown.json()["job"] is None
    assert unknown.json()["history"]["reason"] == NO_DATABASE


def test_logout_drops_the_session_cookie(app_client: TestClient) -> None:
    csrf = log_in(app_client)
    refused = app_client.post("/logout", headers={"Origin": ORIGIN}, follow_redirects=False)
    assert refused.status_code == 403
    answer = app_client.post(
        "/logout", headers={"Origin": ORIGIN, "X-CSRF-Token": csrf}, follow_redirects=False
    )
    assert answer.status_code == 303
    assert COOKIE not in app_client.cookies
    assert app_client.get("/", follow_redirects=False).headers["location"] == "/login"


def test_an_oversized_action_body_is_refused(app_client: TestClient) -> None:
    ids = [f"{n:032d}" for n in range(40_000)]
    answer = app_client.post("/api/dead-letters/purge", json={"ids": ids}, headers=BEARER)
    assert answer.status_code == 413
