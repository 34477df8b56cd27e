"""Prometheus metrics of the command plane; no IMEI label anywhere (cardinality rule).

The per-socket write queue's own metrics (its depth, unsolicited replies) are fields of
:class:`~teltonika.metrics.ServerMetrics`, since the queue is the protocol's write path
and exists without ``--redis`` too.

The objects are built against a registry handed in, so each test can use a fresh
``CollectorRegistry()``; the command plane builds one set against the server's registry
when it is wired (declared the same way as :class:`~teltonika.metrics.ServerMetrics`).
"""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, Counter


@attrs.frozen
class CommandMetrics:
    """The command plane's metrics.

    :ivar registry: where they are registered.
    :ivar commands: ``teltonika_commands_total{status,reason}``: statuses published.
    :ivar registry_failures: ``teltonika_registry_failures_total{operation}``: registry or
        heartbeat writes that failed (Redis down); the device stays connected.
    :ivar janitor_failures: ``teltonika_janitor_failures_total``: janitor passes that failed.
    :ivar janitor_removed: ``teltonika_janitor_removed_total``: registry entries of dead
        instances this instance's janitor removed.
    :ivar update_retries: ``teltonika_command_redis_retries_total{update}``: failed
        attempts of a Redis update that is retried until Redis takes it (``settle``: a
        terminal status; ``take_offline``: moving offline commands at login).
    """

    registry: CollectorRegistry
    commands: Counter
    registry_failures: Counter
    janitor_failures: Counter
    janitor_removed: Counter
    update_retries: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> CommandMetrics:
        """The metrics, registered on *registry* (each test passes a fresh one; the
        command plane creates them once, on the server's registry)."""
        return cls(
            registry=registry,
            commands=Counter(
                "teltonika_commands_total",
                "Command statuses published to commands:responses.",
                ["status", "reason"],
                registry=registry,
            ),
            registry_failures=Counter(
                "teltonika_registry_failures_total",
                "Connection registry or heartbeat operations that failed.",
                ["operation"],
                registry=registry,
            ),
            janitor_failures=Counter(
                "teltonika_janitor_failures_total",
                "Janitor passes that failed (logged, retried on the next tick).",
                registry=registry,
            ),
            janitor_removed=Counter(
                "teltonika_janitor_removed_total",
                "Registry entries of dead instances removed by this instance's janitor.",
                registry=registry,
            ),
            update_retries=Counter(
                "teltonika_command_redis_retries_total",
                "Failed attempts of command-plane Redis updates that are retried.",
                ["update"],
                registry=registry,
            ),
        )
