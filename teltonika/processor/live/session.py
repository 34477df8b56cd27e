"""One authenticated WebSocket connection's conversation, apart from autobahn.

The protocol (:mod:`teltonika.processor.live.protocol`) turns autobahn's callbacks into
calls here; everything this object says goes through its :class:`Outlet`. It owns the
connection's subscriptions, answers requests, limits the inbound rate and re-checks the
user's rights every ``reauth`` seconds.

Subscribing (README.rst, "Live positions"): authorize asynchronously, load the devices
the latest map does not know from PostgreSQL, then :meth:`Hub.attach` reads the map,
registers and writes the snapshot in one synchronous block.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from teltonika.processor.live import messages as m
from teltonika.processor.live.hub import Hub, Outlet, Subscription
from teltonika.processor.live.interfaces import (
    Forbidden,
    IAuthenticator,
    IEventDirectory,
    Unauthenticated,
    UpstreamUnavailable,
    User,
)
from teltonika.processor.live.loader import LatestLoader
from teltonika.processor.live.metrics import LiveMetrics
from teltonika.units import SECONDS


@attrs.frozen
class Limits:
    """Per-connection limits (the ``--live-max-*`` options)."""

    subscriptions: int = 8
    devices: int = 2000
    message_bytes: int = 65536
    rate: float = 20.0
    """Inbound messages a second (and the burst allowed)."""


@attrs.frozen
class Greeting:
    """What ``hello`` says besides the user and the time."""

    server: str
    instance: str
    tick: float
    timeout: float


@attrs.frozen
class SessionParts:
    """What every session of one live server works with (its factory holds one set).

    :ivar now_ms: the server clock in epoch milliseconds.
    """

    hub: Hub
    authenticator: IAuthenticator
    directory: IEventDirectory
    loader: LatestLoader
    clock: IReactorTime
    now_ms: Callable[[], int]
    metrics: LiveMetrics


class Connection(Outlet, Protocol):
    """An outlet that can also be closed."""

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with *code*."""


class RateLimiter:
    """A token bucket of *rate* messages a second with a burst of *rate*.

    ``refused_in_a_row`` counts refusals since the last accepted message: when it
    reaches *rate* the client kept sending a whole second's worth while over the limit,
    which the session treats as a flood (close 4429).
    """

    def __init__(self, rate: float, clock: IReactorTime) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = rate
        self.stamp = clock.seconds()
        self.refused_in_a_row = 0

    def allow(self) -> bool:
        now = self.clock.seconds()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.refused_in_a_row = 0
            return True
        self.refused_in_a_row += 1
        return False

    @property
    def flooding(self) -> bool:
        return self.refused_in_a_row >= self.rate


class LiveSession:
    """See the module docstring.

    :param parts: the hub, authorities, loader, clocks and metrics of the server.
    :param reauth: seconds between two checks of the user's rights.
    """

    _log = Logger()

    def __init__(
        self,
        connection: Connection,
        user: User,
        *,
        parts: SessionParts,
        limits: Limits,
        greeting: Greeting,
        reauth: float = 600 * SECONDS,
    ) -> None:
        self.connection = connection
        self.user = user
        self.hub = parts.hub
        self.authenticator = parts.authenticator
        self.directory = parts.directory
        self.loader = parts.loader
        self.limits = limits
        self.greeting = greeting
        self.clock = parts.clock
        self.now_ms = parts.now_ms
        self.metrics = parts.metrics
        self.reauth = reauth
        self.rate = RateLimiter(limits.rate, parts.clock)
        self.subscriptions: dict[str, Subscription] = {}
        self.pending: dict[str, bool] = {}
        """Subscribe requests being authorized: id -> still wanted."""
        self.closed = False
        self._reauth_call: IDelayedCall | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> None:
        self.connection.send(
            m.encode_hello(
                self.greeting.server,
                self.greeting.instance,
                self.user.id,
                self.now_ms(),
                self.greeting.tick,
                self.greeting.timeout,
                {
                    "subscriptions": self.limits.subscriptions,
                    "devices": self.limits.devices,
                    "message_bytes": self.limits.message_bytes,
                },
            ),
            "hello",
        )
        self._reauth_call = self.clock.callLater(self.reauth, self._start_reauth)

    def close(self) -> None:
        """The connection is gone: release everything."""
        self.closed = True
        if self._reauth_call is not None and self._reauth_call.active():
            self._reauth_call.cancel()
        for subscription in self.subscriptions.values():
            self.hub.detach(subscription)
        self.subscriptions.clear()
        for request_id in self.pending:
            self.pending[request_id] = False

    def resumed(self) -> None:
        """The client reads again: send what its subscriptions held back."""
        for subscription in list(self.subscriptions.values()):
            subscription.release()

    def shutdown(self) -> None:
        """The server stops: ``complete SHUTDOWN`` for each subscription."""
        for request_id in list(self.subscriptions):
            self.connection.send(m.encode_complete(request_id, m.COMPLETE_SHUTDOWN), "complete")
            self.hub.detach(self.subscriptions.pop(request_id))

    # -- inbound -----------------------------------------------------------------------
    def received(self, payload: bytes, binary: bool) -> None:
        if self.closed:
            return
        if binary:
            self._log.warn("Live client sent a binary frame: closing 4400")
            self._close(m.CLOSE_BAD_REQUEST, "binary frames are not part of v1", "binary")
            return
        if not self.rate.allow():
            self._error(m.RATE_LIMITED, "too many messages", None)
            if self.rate.flooding:
                self._log.warn("Live client kept sending over the rate limit: closing 4429")
                self._close(m.CLOSE_TOO_MANY, "too many messages", "rate_limited")
            return
        try:
            request = m.parse_request(payload, self.limits.devices)
        except m.RequestError as e:
            self._error(e.code, e.message, e.request_id)
            if e.fatal:
                self._log.warn("Live client sent {what}: closing 4400", what=e.message)
                self._close(m.CLOSE_BAD_REQUEST, e.message, "not_json")
            return
        if isinstance(request, m.Ping):
            self.connection.send(m.encode_pong(request.id, self.now_ms()), "pong")
        elif isinstance(request, m.Unsubscribe):
            self._unsubscribe(request.id)
        else:
            self._subscribe(request)

    def _unsubscribe(self, request_id: str) -> None:
        subscription = self.subscriptions.pop(request_id, None)
        if subscription is not None:
            self.hub.detach(subscription)
        elif self.pending.get(request_id):
            self.pending[request_id] = False
        else:
            self._error(m.UNKNOWN_ID, "no such subscription", request_id)
            return
        self.connection.send(m.encode_unsubscribed(request_id), "unsubscribed")

    def _subscribe(self, request: m.Subscribe) -> None:
        request_id = request.id
        if request_id in self.subscriptions or request_id in self.pending:
            self.metrics.errors.labels(code=m.DUPLICATE_ID).inc()
            self.connection.send(
                m.encode_error(m.DUPLICATE_ID, "this id is in use", request=request_id), "error"
            )
            return
        if len(self.subscriptions) + len(self.pending) >= self.limits.subscriptions:
            self._error(
                m.TOO_MANY_SUBSCRIPTIONS,
                f"at most {self.limits.subscriptions} subscriptions",
                request_id,
            )
            return
        self.pending[request_id] = True
        d = Deferred.fromCoroutine(self._authorize_and_attach(request))
        d.addErrback(self._internal, request_id)

    async def _authorize_and_attach(self, request: m.Subscribe) -> None:
        started = time.perf_counter()
        request_id = request.id
        try:
            members = await self._authorize(request)
            if len(members) > self.limits.devices:
                raise _TooManyDevices()
            await self.loader.ensure([member.device for member in members])
        except Forbidden:
            self._end_pending(request_id, m.FORBIDDEN, "not allowed")
            return
        except UpstreamUnavailable:
            self._end_pending(request_id, m.UPSTREAM_UNAVAILABLE, "try again later")
            return
        except _TooManyDevices:
            self._end_pending(
                request_id, m.TOO_MANY_DEVICES, f"at most {self.limits.devices} devices"
            )
            return
        except Exception:
            self.pending.pop(request_id, None)
            raise
        if not self.pending.pop(request_id, False) or self.closed:
            return  # unsubscribed (or gone) while being authorized
        subscription = Subscription(request_id, request.event, self.connection)
        self.subscriptions[request_id] = subscription
        self.hub.attach(subscription, members)
        self.metrics.snapshot_seconds.observe(time.perf_counter() - started)

    async def _authorize(self, request: m.Subscribe) -> Sequence[m.Member]:
        if request.event is not None:
            members: Sequence[m.Member] = await self.directory.authorize_event(
                self.user, request.event
            )
            return members
        devices = request.devices or ()
        await self.directory.authorize_devices(self.user, devices)
        return [m.Member(device) for device in devices]

    def _end_pending(self, request_id: str, code: str, message: str) -> None:
        if self.pending.pop(request_id, False) and not self.closed:
            self._error(code, message, request_id)

    def _internal(self, failure: object, request_id: str | None) -> None:
        ref = secrets.token_hex(6)
        self._log.failure("Live request failed (ref {ref})", failure=failure, ref=ref)  # type: ignore[arg-type]
        if not self.closed:
            self.metrics.errors.labels(code=m.INTERNAL).inc()
            self.connection.send(
                m.encode_error(m.INTERNAL, "internal error", request_id, ref=ref), "error"
            )

    def _error(self, code: str, message: str, request_id: str | None) -> None:
        self.metrics.errors.labels(code=code).inc()
        self.connection.send(m.encode_error(code, message, request_id), "error")

    def _close(self, code: int, reason: str, metric: str) -> None:
        self.metrics.closes.labels(reason=metric).inc()
        self.connection.close(code, reason)
        self.close()

    # -- re-checking rights ------------------------------------------------------------
    def _start_reauth(self) -> None:
        d = Deferred.fromCoroutine(self._reauthorize())
        d.addErrback(self._internal, None)

    async def _reauthorize(self) -> None:
        try:
            if self.user.credential is not None:  # Directus: ask again
                self.user = await self.authenticator.authenticate(self.user.credential, fresh=True)
        except Unauthenticated:
            if not self.closed:
                self._error(m.UNAUTHENTICATED, "the session expired", None)
                self._close(m.CLOSE_UNAUTHENTICATED, "the session expired", "unauthenticated")
            return
        except UpstreamUnavailable:
            pass  # keep what was granted; check again next time
        else:
            for request_id, subscription in list(self.subscriptions.items()):
                try:
                    if subscription.event is not None:
                        await self.directory.authorize_event(self.user, subscription.event)
                    elif subscription.topic is not None:
                        await self.directory.authorize_devices(
                            self.user, list(subscription.topic.members)
                        )
                except Forbidden:
                    if self.subscriptions.get(request_id) is subscription:
                        del self.subscriptions[request_id]
                        self.hub.detach(subscription)
                        self.connection.send(
                            m.encode_complete(request_id, m.COMPLETE_REVOKED), "complete"
                        )
                except UpstreamUnavailable:
                    pass
        if not self.closed:
            self._reauth_call = self.clock.callLater(self.reauth, self._start_reauth)


class _TooManyDevices(Exception):
    pass
