"""Conveyor: a Kubernetes-native distributed task queue for Python, on Redis."""

from conveyor.config import QueueConfig, WorkerSettings
from conveyor.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    ConveyorError,
    HandlerError,
    InvalidJob,
    JobNotFound,
    JobTimeout,
    PayloadTooLarge,
    PermanentError,
    RetryableError,
)
from conveyor.job import Backoff, Job, JobInfo, JobSpec
from conveyor.keys import PRIORITY_CLASSES
from conveyor.queue import AsyncQueue, ClassStats, Enqueued, Queue, ReplayReport

__all__ = [
    "PRIORITY_CLASSES",
    "AsyncQueue",
    "BackendError",
    "BackendUnavailable",
    "Backoff",
    "ClassStats",
    "ConfigError",
    "ConveyorError",
    "Enqueued",
    "HandlerError",
    "InvalidJob",
    "Job",
    "JobInfo",
    "JobNotFound",
    "JobSpec",
    "JobTimeout",
    "PayloadTooLarge",
    "PermanentError",
    "Queue",
    "QueueConfig",
    "ReplayReport",
    "RetryableError",
    "WorkerSettings",
]
