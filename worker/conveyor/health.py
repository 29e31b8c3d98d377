"""A tiny probe and metrics endpoint for workers and the operator.

``/metrics`` serves Prometheus metrics (aggregated over processes when
``PROMETHEUS_MULTIPROC_DIR`` is set), ``/healthz`` answers liveness and ``/readyz`` readiness,
each from a callable the owner provides. It runs on the standard library's WSGI server in a
daemon thread: probes must answer while the main thread is busy supervising or draining.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess
from prometheus_client.registry import REGISTRY, Collector

Check = Callable[[], tuple[bool, str]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes arrive every few seconds; logging each would drown the real events."""


def _registry(collectors: Sequence[Collector]) -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = REGISTRY
    for collector in collectors:
        registry.register(collector)
    return registry


def serve(
    port: int,
    live: Check,
    ready: Check,
    host: str = "0.0.0.0",
    collectors: Sequence[Collector] = (),
) -> WSGIServer:
    """Start the endpoint in a daemon thread; returns the server (``shutdown()`` stops it)."""
    metrics_app = make_wsgi_app(_registry(collectors))

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok, detail = (live if path == "/healthz" else ready)()
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
            )
            return [detail.encode() + b"\n"]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    server = make_server(host, port, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="conveyor-health", daemon=True).start()
    return server
