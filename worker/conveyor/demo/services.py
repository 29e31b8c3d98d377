"""The outside world the handlers talk to, run on loopback inside the demo process.

``MailServer`` is a real SMTP server (aiosmtpd) that keeps every message's recipients, so the
report can compare emails received with emails enqueued. ``WebhookEndpoint`` is an HTTP server
standing for the customers' webhook receivers: it fails a share of requests at random (the
handler retries those), always fails the hooks marked ``broken`` and answers 410 Gone to those
marked ``gone``, so some deliveries end as dead letters.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller

from conveyor.local import free_port

FLAKY_SHARE = 0.12
"""Share of requests to healthy endpoints answered 503."""


class _Inbox:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages = 0
        self.recipients: Counter[str] = Counter()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages += 1
            self.recipients.update(envelope.rcpt_tos)
        return "250 Message accepted for delivery"


class MailServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.inbox = _Inbox()
        self._controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port)

    def start(self) -> MailServer:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    @property
    def messages(self) -> int:
        with self.inbox.lock:
            return self.inbox.messages

    def recipients(self) -> Counter[str]:
        with self.inbox.lock:
            return Counter(self.inbox.recipients)


class WebhookEndpoint:
    def __init__(self, seed: int = 11) -> None:
        self.lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.delivered: Counter[str] = Counter()
        """Successful deliveries per event id."""
        self._random = random.Random(seed)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="webhook-endpoint", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks"

    def start(self) -> WebhookEndpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def answer(self, path: str) -> int:
        """The status for ``/hooks/<customer>/<endpoint>/<event>``."""
        parts = path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "hooks":
            return 404
        endpoint, event = parts[2], parts[3]
        with self.lock:
            if endpoint == "gone":
                status = 410
            elif endpoint == "broken":
                status = 500
            else:
                status = 503 if self._random.random() < FLAKY_SHARE else 204
            self.statuses[status] += 1
            if status == 204:
                self.delivered[event] += 1
        return status

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(endpoint.answer(self.path))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Silent: the report counts the requests."""

        return Handler
