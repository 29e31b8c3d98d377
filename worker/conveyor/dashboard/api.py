"""The dashboard's JSON API and event stream; every endpoint requires a login or the token.

Reads are GET; replay, purge, pause and resume are POST with a JSON body and pass the CSRF and
origin checks of ``auth.Guard``. Redis calls are blocking (the producer API), so they run in
Starlette's thread pool.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from conveyor.dashboard.auth import Guard
from conveyor.dashboard.feed import Feed
from conveyor.dashboard.lookup import HistoryLookup, job_record, lookup
from conveyor.queue import Queue

log = logging.getLogger(__name__)

MAX_LISTED = 1000
"""Most dead letters one listing returns."""
MAX_IDS = 10_000
"""Most job ids one action names."""
MAX_BODY = 1 << 20
"""Bytes of an action's JSON body (10,000 ids fit easily)."""


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _filters(params: Mapping[str, str]) -> dict[str, Any]:
    """Dead-letter filters of ``Queue.dead_letters`` from query or body fields."""
    out: dict[str, Any] = {}
    for name, key in (("type", "job_type"), ("group", "group"), ("reason", "reason")):
        if params.get(name):
            out[key] = str(params[name])
    for name in ("since", "until"):
        if params.get(name) not in (None, ""):
            try:
                out[name] = float(params[name])
            except (TypeError, ValueError) as exc:
                raise HTTPException(400, f"{name} must be Unix seconds") from exc
    return out


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes before more is read."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request body over {limit} bytes")
    return bytes(body)


async def _body(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HTTPException(415, "send a JSON body (Content-Type: application/json)")
    try:
        body = orjson.loads(await read_body(request, MAX_BODY))
    except orjson.JSONDecodeError as exc:
        raise HTTPException(400, f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise HTTPException(400, "body must be a JSON object")
    return body


def _ids(body: dict[str, Any]) -> list[str]:
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise HTTPException(400, 'give "ids": a list of job ids, or "all": true with "filters"')
    if len(ids) > MAX_IDS:
        raise HTTPException(400, f"at most {MAX_IDS} ids per action")
    return ids


def _group(body: dict[str, Any]) -> str:
    group = body.get("group")
    if not isinstance(group, str) or not group:
        raise HTTPException(400, 'give "group": the group name')
    return group


class Api:
    def __init__(self, queue: Queue, guard: Guard, feed: Feed, history: HistoryLookup) -> None:
        self.queue = queue
        self.guard = guard
        self.feed = feed
        self.history = history

    def routes(self) -> list[Route]:
        return [
            Route("/api/overview", self.overview),
            Route("/api/events", self.events),
            Route("/api/dead-letters", self.dead_letters),
            Route("/api/dead-letters/replay", self.replay, methods=["POST"]),
            Route("/api/dead-letters/purge", self.purge, methods=["POST"]),
            Route("/api/jobs/{job_id}", self.job),
            Route("/api/groups/pause", self.pause, methods=["POST"]),
            Route("/api/groups/resume", self.resume, methods=["POST"]),
        ]

    # -- reading ---------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        self.guard.require(request)
        return JSONResponse(await self.feed.welcome())

    async def events(self, request: Request) -> Response:
        self.guard.require(request)
        inbox = self.feed.hub.subscribe()

        async def stream() -> AsyncIterator[ServerSentEvent]:
            try:
                yield ServerSentEvent(
                    orjson.dumps(await self.feed.welcome()).decode(), event="stats"
                )
                while (message := await inbox.get()) is not None:
                    yield ServerSentEvent(orjson.dumps(message).decode(), event=message["type"])
            finally:
                self.feed.hub.unsubscribe(inbox)

        return EventSourceResponse(stream(), ping=15, send_timeout=30)

    async def dead_letters(self, request: Request) -> Response:
        self.guard.require(request)
        filters = _filters(request.query_params)
        try:
            limit = min(MAX_LISTED, max(1, int(request.query_params.get("limit", 100))))
        except ValueError as exc:
            raise HTTPException(400, "limit must be a number") from exc

        def listing() -> list[dict[str, Any]]:
            return [job_record(i) for i in self.queue.dead_letters(limit=limit, **filters)]

        return JSONResponse({"dead_letters": await run_in_threadpool(listing), "limit": limit})

    async def job(self, request: Request) -> Response:
        self.guard.require(request)
        job_id = request.path_params["job_id"]
        panel = await run_in_threadpool(lookup, self.queue, self.history, job_id)
        # Without a history, a job Redis has forgotten may still have existed: say so instead.
        if (
            panel["job"] is None
            and panel["history"]["available"]
            and not panel["history"]["events"]
        ):
            raise HTTPException(404, f"no job {job_id} in Redis or in the history")
        return JSONResponse(panel)

    # -- acting ----------------------------------------------------------------------------------

    async def _targets(self, request: Request) -> list[str]:
        """The ids an action names: listed, or every dead letter matching filters."""
        body = await _body(request)
        if body.get("all") is True:
            filters = _filters(body.get("filters") or {})
            return await run_in_threadpool(
                lambda: [i.id for i in self.queue.dead_letters(**filters)]
            )
        return _ids(body)

    async def replay(self, request: Request) -> Response:
        self.guard.require(request, action=True)
        ids = await self._targets(request)
        report = await run_in_threadpool(self.queue.replay, ids)
        log.info("dashboard replayed %d dead letters", report.replayed, extra={"event": "replay"})
        return JSONResponse(
            {
                "replayed": report.replayed,
                "missing": report.missing or [],
                "skipped": report.skipped,
            }
        )

    async def purge(self, request: Request) -> Response:
        self.guard.require(request, action=True)
        ids = await self._targets(request)
        purged = await run_in_threadpool(self.queue.purge, ids)
        log.info("dashboard purged %d dead letters", purged, extra={"event": "purge"})
        return JSONResponse({"purged": purged, "skipped": len(ids) - purged})

    async def pause(self, request: Request) -> Response:
        self.guard.require(request, action=True)
        group = _group(await _body(request))
        await run_in_threadpool(self.queue.pause_group, group)
        self.feed.changed.set()  # pausing writes no event; show it without waiting for the poll
        log.info("dashboard paused group %s", group, extra={"event": "pause"})
        return JSONResponse({"paused": group})

    async def resume(self, request: Request) -> Response:
        self.guard.require(request, action=True)
        group = _group(await _body(request))
        await run_in_threadpool(self.queue.resume_group, group)
        self.feed.changed.set()
        log.info("dashboard resumed group %s", group, extra={"event": "resume"})
        return JSONResponse({"resumed": group})
