"""Job handlers, registered by job type with the ``@task`` decorator.

A handler takes the ``Job`` and returns nothing; it may be ``async def`` (run on the worker's
event loop) or a plain function (run in a thread). Raising ``PermanentError`` (or an exception
type listed in ``permanent``) dead-letters the job at once; any other exception is retried
after the job type's backoff while attempts remain.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from conveyor.errors import ConfigError
from conveyor.job import Backoff, Job

Handler = Callable[[Job], Awaitable[None]] | Callable[[Job], None]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class TaskDef:
    job_type: str
    handler: Handler
    is_async: bool
    backoff: Backoff | None
    """Overrides the backoff the producer stored with the job, for retries by this worker."""
    permanent: tuple[type[BaseException], ...]


class Registry:
    """Maps job types to handlers; a worker runs the job types of one registry."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskDef] = {}

    def task(
        self,
        job_type: str | None = None,
        *,
        backoff: Backoff | None = None,
        permanent: tuple[type[BaseException], ...] = (),
    ) -> Callable[[F], F]:
        def register(handler: F) -> F:
            name = job_type or handler.__name__
            if name in self._tasks and self._tasks[name].handler is not handler:
                raise ConfigError(f"job type {name!r} already has a handler")
            self._tasks[name] = TaskDef(
                name, handler, inspect.iscoroutinefunction(handler), backoff, permanent
            )
            return handler

        return register

    def get(self, job_type: str) -> TaskDef | None:
        return self._tasks.get(job_type)

    def __contains__(self, job_type: str) -> bool:
        return job_type in self._tasks

    def job_types(self) -> list[str]:
        return sorted(self._tasks)


default_registry = Registry()
task = default_registry.task
