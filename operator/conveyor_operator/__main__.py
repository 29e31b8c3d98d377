"""``python -m conveyor_operator``: the operator process (the entrypoint of Dockerfile.operator).

Start-up order: serve probes and metrics, wait for the leader Lease, then run Kopf (which
reconciles worker Deployments) beside the autoscaling loop. Losing the Lease stops everything
and exits non-zero so that Kubernetes restarts the replica as a standby.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass

import kopf
from kubernetes import client, config

from conveyor import health, logs
from conveyor.config import _FromEnv, setting
from conveyor_operator import handlers
from conveyor_operator.kube import Kube, bound_requests, preload
from conveyor_operator.leader import LeaseElector
from conveyor_operator.runtime import Runtime, install
from conveyor_operator.scaler import Scaler
from conveyor_operator.watchdog import WatchGuard

log = logging.getLogger("conveyor_operator")
EXIT_LEASE_LOST = 3


@dataclass(frozen=True)
class OperatorSettings(_FromEnv):
    """How the operator runs; every field is read from the variable named in its metadata."""

    namespaces: tuple[str, ...] = setting(
        (),
        "Namespaces to watch, comma-separated; empty watches the whole cluster.",
        env="CONVEYOR_OPERATOR_NAMESPACES",
    )
    lease_namespace: str = setting("default", "Namespace of the leader Lease.", env="POD_NAMESPACE")
    lease_name: str = setting(
        "conveyor-operator", "Name of the leader Lease.", env="CONVEYOR_OPERATOR_LEASE"
    )
    lease_duration: float = setting(
        15.0,
        "Seconds a leader lease lasts without renewal.",
        env="CONVEYOR_OPERATOR_LEASE_DURATION",
    )
    identity: str = setting(
        "", "This replica's identity; defaults to pod name or host:pid.", env="POD_NAME"
    )
    health_port: int = setting(
        8080, "Port of /healthz, /readyz and /metrics.", env="CONVEYOR_OPERATOR_HEALTH_PORT"
    )
    health_host: str = setting(
        "0.0.0.0",
        "Address the probe endpoint binds.",
        env="CONVEYOR_OPERATOR_HEALTH_HOST",
    )
    watch_timeout: float = setting(
        60.0,
        "Seconds before the API server ends a watch request.",
        env="CONVEYOR_OPERATOR_WATCH_TIMEOUT",
    )
    request_timeout: float = setting(
        30.0,
        "Seconds any other API request may take before it is abandoned and retried.",
        env="CONVEYOR_OPERATOR_REQUEST_TIMEOUT",
    )
    log_format: str = setting("text", "text or json.", env="CONVEYOR_LOG_FORMAT")
    log_level: str = setting("INFO", "Log level.", env="CONVEYOR_LOG_LEVEL")


def _load_kube_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


async def _operate(
    settings: OperatorSettings, scaler: Scaler, elector: LeaseElector, guard: WatchGuard
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    lost = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    renewing = threading.Event()

    def on_lost() -> None:
        loop.call_soon_threadsafe(lost.set)
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=elector.keep, args=(renewing, on_lost), daemon=True).start()
    handlers.WATCH_TIMEOUT = settings.watch_timeout
    handlers.REQUEST_TIMEOUT = settings.request_timeout
    scaling = asyncio.create_task(scaler.run(), name="scaler")
    guarding = asyncio.create_task(guard.run(), name="watch-guard")
    try:
        await kopf.operator(
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
            stop_flag=stop,
        )
    finally:
        scaling.cancel()
        guarding.cancel()
        await asyncio.gather(scaling, guarding, return_exceptions=True)
        await scaler.reader.close()
        renewing.set()
    if lost.is_set():
        return EXIT_LEASE_LOST
    elector.release()
    return 0


def main() -> int:
    settings = OperatorSettings.from_env()
    logs.configure(settings.log_level, settings.log_format)
    identity = settings.identity or f"{socket.gethostname()}:{os.getpid()}"
    _load_kube_config()
    api = client.ApiClient()
    # Names the replica in every audit entry, so that writes can be told apart per replica.
    api.user_agent = f"conveyor-operator/{identity}"
    bound_requests(api, connect=min(10.0, settings.request_timeout), read=settings.request_timeout)
    kube = Kube(api, instance=identity)
    guard = WatchGuard(
        kube,
        settings.namespaces,
        interval=max(5.0, settings.watch_timeout / 4),
        # Kopf abandons a silent watch after the client timeout (the watch timeout + 10 s, see
        # handlers.configure); an object still undelivered a while after that is not late but
        # lost.
        grace=settings.watch_timeout + 20.0,
    )
    leading = threading.Event()
    health.serve(
        settings.health_port,
        live=guard.health,
        ready=lambda: (leading.is_set(), "leader" if leading.is_set() else "standby"),
        host=settings.health_host,
    )
    elector = LeaseElector(
        client.CoordinationV1Api(api),
        settings.lease_namespace,
        name=settings.lease_name,
        identity=identity,
        duration=settings.lease_duration,
        renew_every=max(1.0, settings.lease_duration / 3),
    )
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    log.info(
        "operator %s waiting for the leader lease %s/%s",
        identity,
        settings.lease_namespace,
        settings.lease_name,
        extra={"event": "lease_waiting"},
    )
    preload()
    if not elector.acquire(stopping):
        return 0
    leading.set()
    log.info("operator %s is the leader", identity, extra={"event": "leading"})
    scaler = Scaler(kube, identity)
    install(Runtime(kube, scaler, identity, guard))
    return asyncio.run(_operate(settings, scaler, elector, guard))


if __name__ == "__main__":
    sys.exit(main())
