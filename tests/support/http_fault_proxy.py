"""A TLS-terminating HTTP/1.1 proxy in front of the apiserver that fails chosen requests.

Kubernetes clients reach the apiserver through it with a kubeconfig whose server is
:attr:`HttpFaultProxy.url` (``K8sCluster.via``); the proxy serves a certificate from the
cluster's own CA (``K8sCluster.server_cert``), so the kubeconfig's CA stays valid. Bearer
tokens pass through untouched, so the apiserver and its audit log see the real client.

Every request is matched against the rules in order. A matching rule either answers the request
itself (say 429 with ``Retry-After``; the apiserver never sees it) or *hangs* it: the connection
stays open and nothing ever comes back, like a watch a middlebox has silently dropped. Requests
no rule takes are forwarded over a fresh TLS connection with ``Connection: close``, so each
client connection carries exactly one request and no request slips past the rules on a reused
keep-alive connection. The proxy runs its own asyncio loop in a background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from tests.support.proxy import LoopServer

_HEAD_LIMIT = 64 * 1024
_REASONS = {403: "Forbidden", 429: "TooManyRequests", 500: "InternalError"}


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: Mapping[str, str]
    """Lower-cased names."""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)

    @property
    def is_watch(self) -> bool:
        return self.method == "GET" and self.query.get("watch", [""])[0] in ("true", "1")


def watches(resource: str) -> Callable[[Request], bool]:
    """Matches watch requests of ``resource`` (a plural, e.g. ``taskqueues``), any namespace."""
    return lambda req: req.is_watch and req.path.rstrip("/").rsplit("/", 1)[-1] == resource


@dataclass
class Rule:
    match: Callable[[Request], bool]
    action: Literal["answer", "hang"]
    status: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    remaining: int | None = None
    """How many more requests this rule takes; None for every one."""
    hits: int = 0


class HttpFaultProxy(LoopServer):
    def __init__(self, upstream: str, ca_file: Path, cert_file: Path, key_file: Path) -> None:
        parts = urlsplit(upstream)
        super().__init__()
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 443)
        self.seen: list[tuple[float, Request, str]] = []
        """Every request (``time.time()``, request, outcome): ``forwarded``, ``hung`` or the
        status it was answered with."""
        self._rules: list[Rule] = []
        self._server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_ctx.load_cert_chain(cert_file, key_file)
        # HTTP/1.1 only: the proxy reads request heads, not HTTP/2 frames.
        self._server_ctx.set_alpn_protocols(["http/1.1"])
        self._client_ctx = ssl.create_default_context(cafile=str(ca_file))
        self._client_ctx.set_alpn_protocols(["http/1.1"])
        self._hung: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # -- rules (thread-safe: they run on the proxy's loop) ------------------------------------

    def answer(
        self,
        match: Callable[[Request], bool],
        status: int,
        *,
        times: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Rule:
        """Answer the next ``times`` matching requests (every one if None) with ``status``."""
        rule = Rule(match, "answer", status, dict(headers or {}), times)
        self._call(self._add(rule))
        return rule

    def hang(self, match: Callable[[Request], bool], *, times: int | None = None) -> Rule:
        """Take matching requests and never answer them, keeping their connections open."""
        rule = Rule(match, "hang", remaining=times)
        self._call(self._add(rule))
        return rule

    def clear(self) -> None:
        """Drop every rule and close the hung connections (their clients see a reset)."""
        self._call(self._clear())

    def outcomes(
        self, outcome: str, match: Callable[[Request], bool] | None = None
    ) -> list[tuple[float, Request]]:
        """When and which requests met ``outcome`` (and ``match``), oldest first."""
        return [
            (t, req)
            for t, req, out in list(self.seen)
            if out == outcome and (match is None or match(req))
        ]

    # -- internals ----------------------------------------------------------------------------

    async def _add(self, rule: Rule) -> None:
        self._rules.append(rule)

    async def _clear(self) -> None:
        self._rules.clear()
        for writer in list(self._hung):
            writer.transport.abort()
        self._hung.clear()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", 0, ssl=self._server_ctx, limit=_HEAD_LIMIT
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._clear()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _take(self, req: Request) -> Rule | None:
        for rule in self._rules:
            if rule.remaining != 0 and rule.match(req):
                if rule.remaining is not None:
                    rule.remaining -= 1
                rule.hits += 1
                return rule
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
            writer.transport.abort()
            return
        req = _parse(head)
        rule = self._take(req)
        try:
            if rule is None:
                self.seen.append((time.time(), req, "forwarded"))
                await self._forward(head, reader, writer)
            elif rule.action == "hang":
                self.seen.append((time.time(), req, "hung"))
                self._hung.add(writer)
                # Until the client gives up (its own timeout) or clear() aborts it.
                while await reader.read(65536):
                    pass
            else:
                self.seen.append((time.time(), req, str(rule.status)))
                writer.write(_status_response(rule.status, rule.headers))
                await writer.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            self._hung.discard(writer)
            writer.transport.abort()

    async def _forward(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            *self.upstream, ssl=self._client_ctx, server_hostname=self.upstream[0]
        )
        try:
            up_writer.write(_close_after(head))
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            up_writer.transport.abort()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        # The response ends the exchange; a TLS stream cannot half-close, so stop both ways.
        dst.transport.close()


def _parse(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = [*lines[0].split(" ", 2), "", ""][:3]
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return Request(method, target, headers)


def _close_after(head: bytes) -> bytes:
    lines = head.decode("latin-1").split("\r\n")
    kept = [
        line
        for line in lines[1:]
        if line and line.split(":", 1)[0].strip().lower() not in ("connection", "keep-alive")
    ]
    return "\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode("latin-1")


def _status_response(status: int, headers: Mapping[str, str]) -> bytes:
    # A metav1.Status body, as the apiserver itself sends, so clients parse it the usual way.
    body = json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"injected by the test's fault proxy ({status})",
            "reason": _REASONS.get(status, "InternalError"),
            "code": status,
        }
    ).encode()
    lines = [
        f"HTTP/1.1 {status} Injected",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers.items()),
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1") + body
