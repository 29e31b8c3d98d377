"""Loading and calling the Lua scripts that make every state change atomic.

Each operation lives in ``lua/<name>.lua``; the shared prelude (key names, clock, enqueue,
fail and dead-letter steps) is prepended at load time. Scripts run by SHA and are loaded again
transparently after a Redis restart (``NOSCRIPT``). A single ``LuaScript`` serves both the
synchronous producer API and the asyncio worker.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

import redis
import redis.asyncio

from conveyor.errors import translate_redis_error

_PRELUDE = "_prelude.lua"


@cache
def _source(name: str) -> str:
    lua = resources.files("conveyor") / "lua"
    return (lua / _PRELUDE).read_text() + "\n" + (lua / f"{name}.lua").read_text()


class LuaScript:
    """One Lua operation, callable on a sync or an asyncio Redis client."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = _source(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def run(self, client: redis.Redis, keys: Sequence[str | bytes], args: list[Any]) -> Any:
        try:
            try:
                return client.evalsha(self.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                return client.eval(self.source, len(keys), *keys, *args)
        except redis.exceptions.RedisError as exc:
            raise translate_redis_error(exc, self.name) from exc

    async def arun(
        self, client: redis.asyncio.Redis, keys: Sequence[str | bytes], args: list[Any]
    ) -> Any:
        try:
            try:
                return await client.evalsha(self.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                return await client.eval(self.source, len(keys), *keys, *args)
        except redis.exceptions.RedisError as exc:
            raise translate_redis_error(exc, self.name) from exc


ENQUEUE = LuaScript("enqueue")
CLAIM = LuaScript("claim")
ACK = LuaScript("ack")
FAIL = LuaScript("fail")
HANDBACK = LuaScript("handback")
EXTEND = LuaScript("extend")
RECOVER = LuaScript("recover")
RELEASE = LuaScript("release")
REPLAY = LuaScript("replay")
PURGE = LuaScript("purge")
RESUME = LuaScript("resume")
LIMIT = LuaScript("limit")
SCHEDULE = LuaScript("schedule")
STATS = LuaScript("stats")
