"""The operations endpoint: Prometheus metrics, ``/healthz`` and ``/readyz`` on one listener.

It serves operators and Prometheus only; the server has no user-facing HTTP (seed 001,
invariant 1), so the default endpoint listens on loopback.

* ``/metrics`` — prometheus_client's own Twisted resource over our registry;
* ``/healthz`` — 200 while the process runs (liveness);
* ``/readyz`` — 200 when every readiness check passes, else 503 with the failing checks
  (for example "sink: redis unreachable"), so a load balancer stops sending devices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.application import strports
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorCore
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

ReadinessCheck = Callable[[], bool]
"""A zero-argument callable: True when that part of the service is ready."""

DEFAULT_SERVER_METRICS: Final = "tcp:9105:interface=127.0.0.1"
DEFAULT_PROCESSOR_METRICS: Final = "tcp:9106:interface=127.0.0.1"


class HealthResource(Resource):
    """``/healthz``: the process is alive and its reactor turns."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class ReadinessResource(Resource):
    """``/readyz``: 200 when all named checks pass, else 503 listing the failing ones."""

    isLeaf = True

    def __init__(self, checks: Mapping[str, ReadinessCheck]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.checks = checks

    def failing(self) -> list[str]:
        """Names of the checks that do not pass (a raising check counts as failing)."""
        out = []
        for name, check in self.checks.items():
            try:
                ok = check()
            except Exception:
                ok = False
            if not ok:
                out.append(name)
        return out

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        failing = self.failing()
        if failing:
            request.setResponseCode(503)
            return ("not ready: " + ", ".join(failing) + "\n").encode()
        return b"ready\n"


def ops_site(registry: CollectorRegistry, checks: Mapping[str, ReadinessCheck]) -> Site:
    """The ``Site`` serving ``/metrics``, ``/healthz`` and ``/readyz``."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    root.putChild(b"healthz", HealthResource())
    root.putChild(b"readyz", ReadinessResource(checks))
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    return site


def ops_service(
    description: str,
    registry: CollectorRegistry,
    checks: Mapping[str, ReadinessCheck],
    reactor: IReactorCore | None = None,
) -> IService:
    """A service listening on *description* (a strports string) with :func:`ops_site`."""
    service: IService = strports.service(description, ops_site(registry, checks), reactor=reactor)
    return service
