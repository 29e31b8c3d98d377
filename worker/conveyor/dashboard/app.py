"""Assembling the dashboard: pages, API, static files, security headers and the live feed.

``create_app`` builds a Starlette application for given settings (tests drive it directly);
``serve`` runs it under uvicorn for ``conveyor dashboard``.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from string import Template
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.connection import connect_async
from conveyor.dashboard.api import Api, JSONResponse, read_body
from conveyor.dashboard.auth import COOKIE, Guard
from conveyor.dashboard.feed import Feed
from conveyor.dashboard.lookup import HistoryLookup
from conveyor.dashboard.settings import DashboardSettings
from conveyor.queue import Queue

log = logging.getLogger(__name__)

FAILED_LOGIN_DELAY = 0.5
"""Seconds a wrong token waits for its answer, slowing down guessing."""
MAX_LOGIN_BODY = 4096
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        b"form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    """Adds the headers above to every response (pure ASGI, so the event stream still flows)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def _page(name: str, **values: str) -> str:
    text = (resources.files(__package__) / "pages" / name).read_text()
    return Template(text).substitute({k: html.escape(v) for k, v in values.items()})


class Pages:
    def __init__(self, settings: DashboardSettings, guard: Guard) -> None:
        self.settings = settings
        self.guard = guard

    def routes(self) -> list[Route]:
        return [
            Route("/", self.index),
            Route("/login", self.login_form),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
        ]

    async def index(self, request: Request) -> Response:
        identity = self.guard.identify(request)
        if identity is None or identity.kind != "session":
            return RedirectResponse("/login", status_code=303)
        return HTMLResponse(_page("index.html", csrf=identity.csrf, queue=self.settings.queue))

    async def login_form(self, request: Request) -> Response:
        return HTMLResponse(_page("login.html", error=""))

    async def login(self, request: Request) -> Response:
        if not self.guard.same_origin(request, required=False):
            raise HTTPException(403, "cross-origin request refused")
        fields = parse_qs((await read_body(request, MAX_LOGIN_BODY)).decode(errors="replace"))
        if not self.guard.token_matches(fields.get("token", [""])[0]):
            await asyncio.sleep(FAILED_LOGIN_DELAY)
            page = _page("login.html", error="That token is not right.")
            return HTMLResponse(page, status_code=401)
        response = RedirectResponse("/", status_code=303)
        self.guard.set_cookie(response, self.guard.new_session())
        return response

    async def logout(self, request: Request) -> Response:
        self.guard.require(request, action=True)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response


async def _error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):
        raise exc
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_app(settings: DashboardSettings) -> Starlette:
    queue = Queue.from_url(settings.redis_url, settings.queue)
    events_client = connect_async(settings.redis_url)
    feed = Feed(queue, events_client, settings.poll_interval)
    history = HistoryLookup(settings.database_url)
    guard = Guard(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(feed.follow_events(), name="dashboard-events"),
            asyncio.create_task(feed.poll(), name="dashboard-poll"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await events_client.aclose()
            queue.client.close()
            history.close()

    static = Path(str(resources.files(__package__) / "static"))
    return Starlette(
        routes=[
            *Pages(settings, guard).routes(),
            *Api(queue, guard, feed, history).routes(),
            Mount("/static", StaticFiles(directory=static), name="static"),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: _error},
        middleware=[Middleware(SecurityHeaders)],
    )


def serve(settings: DashboardSettings) -> None:
    import uvicorn

    app = create_app(settings)
    log.info(
        "dashboard of queue %s on http://%s:%d/",
        settings.queue,
        settings.host,
        settings.port,
        extra={"event": "dashboard_started", "queue": settings.queue},
    )
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_config=None)
