"""A TCP proxy on 127.0.0.1 that a test owns, to break a worker's Redis connections on cue.

The proxy runs its own asyncio loop in a background thread. In ``pass`` mode it forwards bytes
both ways, optionally holding each client-to-server chunk for ``request_delay`` seconds and
each server-to-client chunk for ``response_delay`` seconds, and
passes a client's close on as a FIN after the data, as a direct connection would.
``blackhole`` keeps every connection open but forwards nothing, like a peer that vanished
without a FIN: the client only notices through its own timeouts. ``reset`` aborts every open
connection with an RST and resets new ones at once, like a restarted middlebox.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, Literal, Self

Mode = Literal["pass", "blackhole", "reset"]


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.frozen = False

    def abort(self) -> None:
        _abort(self.client)
        _abort(self.upstream)


class LoopServer:
    """A server a test owns, on its own asyncio loop in a background thread: ``start`` binds
    it on 127.0.0.1 (``_listen``, which sets ``port``), ``stop`` closes it (``_close``)."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> Self:
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(5)

    async def _listen(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError


class TcpProxy(LoopServer):
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        super().__init__()
        self.target = (target_host, target_port)
        self.mode: Mode = "pass"
        self.request_delay = 0.0
        self.response_delay = 0.0
        self.connections_seen = 0
        self._links: set[_Link] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def set_mode(self, mode: Mode) -> None:
        """Switch mode; ``blackhole`` and ``reset`` also act on already open connections."""
        self._call(self._switch(mode))

    def freeze_open(self) -> int:
        """Blackhole only the connections open now; new ones still pass. Returns how many."""
        return int(self._call(self._freeze_open()))

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        self._links.clear()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _switch(self, mode: Mode) -> None:
        self.mode = mode
        for link in list(self._links):
            if mode == "reset":
                link.abort()
                self._links.discard(link)
            elif mode == "blackhole":
                link.frozen = True

    async def _freeze_open(self) -> int:
        for link in self._links:
            link.frozen = True
        return len(self._links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_seen += 1
        if self.mode == "reset":
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(writer)
            return
        link = _Link(writer, up_writer)
        link.frozen = self.mode == "blackhole"
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pump(link, reader, up_writer, upstream=True),
                self._pump(link, up_reader, writer, upstream=False),
            )
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(
        self, link: _Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        try:
            while data := await src.read(65536):
                if link.frozen:
                    continue  # swallowed: the peer never hears of it
                if upstream and self.request_delay:
                    await asyncio.sleep(self.request_delay)
                elif not upstream and self.response_delay:
                    await asyncio.sleep(self.response_delay)
                dst.write(data)
                await dst.drain()
            if not link.frozen and dst.can_write_eof():
                dst.write_eof()
                await dst.drain()
                return
        except (ConnectionError, OSError):
            pass
        link.abort()
