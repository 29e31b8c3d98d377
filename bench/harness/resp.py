"""A minimal RESP2 client, so the harness itself runs on a bare interpreter with no installs."""

from __future__ import annotations

import socket

Reply = int | bytes | str | list["Reply"] | None


class RedisError(RuntimeError):
    pass


class Client:
    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._file = self._sock.makefile("rb")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def call(self, *args: str | int | float) -> Reply:
        parts = [str(a).encode() for a in args]
        out = [b"*%d\r\n" % len(parts)]
        for p in parts:
            out.append(b"$%d\r\n%s\r\n" % (len(p), p))
        self._sock.sendall(b"".join(out))
        return self._read()

    def _read(self) -> Reply:
        line = self._file.readline()
        if not line:
            raise RedisError("connection closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self._file.read(size + 2)
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._read() for _ in range(count)]
        raise RedisError(f"unexpected reply {line!r}")

    def info(self, section: str) -> dict[str, str]:
        raw = self.call("INFO", section)
        assert isinstance(raw, bytes)
        fields: dict[str, str] = {}
        for line in raw.decode().splitlines():
            if ":" in line and not line.startswith("#"):
                key, value = line.split(":", 1)
                fields[key] = value
        return fields
