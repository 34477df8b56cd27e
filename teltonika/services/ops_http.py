"""The operations endpoint: Prometheus metrics, ``/healthz`` and ``/readyz`` on one listener.

It serves operators and Prometheus only; the server has no user-facing HTTP
(docs/design.rst, 'Operators only'), so the default endpoint listens on loopback.

* ``/metrics`` — prometheus_client's own Twisted resource over our registry;
* ``/healthz`` — 200 while the process runs (liveness);
* ``/readyz`` — 200 when every readiness check passes, else 503 with the failing checks
  (for example "sink: redis unreachable"), so a load balancer stops sending devices.

A port that is taken (a second instance on one host) stops the start with one line that
names the endpoint and the option to change, as a taken device port does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
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


class OpsListener(StreamServerEndpointService):
    """The ops endpoint's listener: binds in ``privilegedStartService`` (as
    ``strports.service`` does), and when the port is taken logs one critical line naming
    the endpoint and *option*, then exits with status 1 instead of a traceback.

    :param description: the strports description (named in the message).
    :param option: the command-line option that sets it.
    """

    _log = Logger()
    _raiseSynchronously = True  # noqa: N815 (Twisted name: raise a bind error at once)

    def __init__(self, description: str, factory: Site, reactor: IReactorCore, option: str) -> None:
        endpoint = serverFromString(reactor, description)
        super().__init__(endpoint, factory)  # type: ignore[no-untyped-call]
        self.description = description
        self.option = option

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except CannotListenError as error:
            self._log.critical(
                "Cannot listen for /metrics on {endpoint}: {error}. Choose another port with "
                "{option} (or {option} off)",
                endpoint=self.description,
                error=str(error),
                option=self.option,
            )
            raise SystemExit(1) from None


def ops_service(
    description: str,
    registry: CollectorRegistry,
    checks: Mapping[str, ReadinessCheck],
    reactor: IReactorCore | None = None,
    option: str = "--metrics",
) -> IService:
    """A service listening on *description* (a strports string) with :func:`ops_site`.

    :param option: the option that set *description*, named when the port is taken.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return OpsListener(description, ops_site(registry, checks), reactor, option)
