"""The master of a Sentinel-managed Redis, followed across failovers.

txredisapi's ``Sentinel(...).master_for(...)`` follows a failover, but its discovery asks
each sentinel once and then waits its whole ``discovery_timeout`` (10 s) when none names
a usable master: during a failover writes resumed about 13 s after the master died,
although Sentinel had promoted a replica within ~2 s. So the discovery here
(:class:`MasterDiscovery`) asks every sentinel again each :data:`DISCOVERY_INTERVAL`
until one names a master that is neither subjectively nor objectively down nor being
failed over, for at most :data:`DISCOVERY_TIMEOUT` per connection attempt; txredisapi's
reconnecting pool slot then retries (after at most :data:`RECONNECT_MAX_DELAY`).

Each connection attempt discovers the master again, so a lost connection (the master
died) leads to the new master by itself; a connection to a server that is not (or no
longer) a master is dropped:

* at connect, ``ROLE`` must say ``master`` (txredisapi's own check, kept);
* afterwards, a ``READONLY`` error reply (a master demoted to a replica under a live
  connection) closes the connection: the command that got it fails (nothing is ACKed)
  and the next attempt rediscovers.

What the connection does *not* do: TLS to the master and the sentinels uses Twisted's
default client context (no certificate verification, as txredisapi's own
``ssl_context_factory=True``); a sentinel username (Redis 6.2+ ``sentinel sentinel-user``)
is not supported, only its password.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from teltonika.redis.connect import SentinelAddress
from teltonika.redis.connection import RedisConnection, Reply

DISCOVERY_INTERVAL: Final = 0.2
"""Seconds between two rounds of questions to the sentinels while none names a master."""

DISCOVERY_TIMEOUT: Final = 5.0
"""Seconds one discovery may take before the connection attempt fails (and is retried)."""

ASK_TIMEOUT: Final = 1.0
"""Seconds one sentinel may take to answer one question."""

RECONNECT_MAX_DELAY: Final = 0.5
"""Longest pause between two connection attempts: the discovery itself paces them."""

UNUSABLE_FLAGS: Final = frozenset({"s_down", "o_down", "disconnected", "failover_in_progress"})
"""Flags of ``SENTINEL MASTER`` that say the named address is not (yet) the master."""

_log = Logger()


class MasterNotFoundError(ConnectionError):
    """No sentinel named a usable master within the discovery's bound."""


def master_state(reply: object) -> dict[str, str]:
    """A ``SENTINEL MASTER name`` reply (a flat field/value list, or a dict) as a dict of
    text; anything else gives an empty dict."""
    if isinstance(reply, dict):
        items = list(reply.items())
    elif isinstance(reply, list | tuple) and len(reply) % 2 == 0:
        items = list(zip(reply[::2], reply[1::2], strict=True))
    else:
        return {}
    state: dict[str, str] = {}
    for raw_key, raw_value in items:
        key = raw_key.decode("utf-8", "replace") if isinstance(raw_key, bytes) else raw_key
        value = raw_value.decode("utf-8", "replace") if isinstance(raw_value, bytes) else raw_value
        if isinstance(key, str) and isinstance(value, str | int):
            state[key] = str(value)
    return state


def usable_master(state: dict[str, str]) -> tuple[str, int] | None:
    """The master's ``(host, port)`` when the sentinel's state says it is usable."""
    flags = set(state.get("flags", "").split(","))
    if "master" not in flags or flags & UNUSABLE_FLAGS:
        return None
    host, port = state.get("ip", ""), state.get("port", "")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


class MasterDiscovery:
    """Ask the sentinels for the master of *service* until one names a usable one.

    :param ask: ``ask(i)`` sends ``SENTINEL MASTER service`` to sentinel *i* and returns
        the reply's Deferred.
    :param count: how many sentinels there are.
    """

    def __init__(
        self,
        ask: Callable[[int], Deferred[Reply]],
        count: int,
        service: str,
        clock: IReactorTime,
        *,
        interval: float = DISCOVERY_INTERVAL,
        timeout: float = DISCOVERY_TIMEOUT,
        ask_timeout: float = ASK_TIMEOUT,
    ) -> None:
        if count < 1:
            raise ValueError("at least one sentinel is needed")
        self._ask = ask
        self.count = count
        self.service = service
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self.ask_timeout = ask_timeout

    def discover(self) -> Deferred[tuple[str, int]]:
        """Fires with the master's ``(host, port)``, or fails with
        :class:`MasterNotFoundError` after :attr:`timeout` seconds."""
        return Deferred.fromCoroutine(self._discover())

    async def _discover(self) -> tuple[str, int]:
        deadline = self.clock.seconds() + self.timeout
        rounds = 0
        while True:
            rounds += 1
            found, why = await self._round()
            if found is not None:
                return found
            if self.clock.seconds() + self.interval > deadline:
                raise MasterNotFoundError(
                    f"no sentinel named a usable master for {self.service!r} in "
                    f"{self.timeout:g} s ({rounds} rounds; last: {why})"
                )
            await deferLater(self.clock, self.interval, lambda: None)

    def _round(self) -> Deferred[tuple[tuple[str, int] | None, str]]:
        """Ask every sentinel once; fires at the first usable answer, or with
        ``(None, why)`` when all have answered, failed or timed out."""
        result: Deferred[tuple[tuple[str, int] | None, str]] = Deferred()
        reasons: list[str] = []

        def answered(reply: object) -> None:
            if result.called:
                return
            state = master_state(reply)
            found = usable_master(state)
            if found is not None:
                result.callback((found, ""))
                return
            reasons.append(f"flags {state.get('flags', '?')} for {state.get('ip', '?')}")
            settled()

        def failed(failure: Failure) -> None:
            if not result.called:
                reasons.append(failure.getErrorMessage() or type(failure.value).__name__)
                settled()

        def settled() -> None:
            if len(reasons) == self.count and not result.called:
                result.callback((None, "; ".join(sorted(set(reasons)))))

        for index in range(self.count):
            try:
                asked = self._ask(index)
            except Exception as error:
                failed(_failure(error))
                continue
            asked.addTimeout(self.ask_timeout, self.clock)
            asked.addCallbacks(answered, failed)
        return result


def _failure(error: Exception) -> Failure:
    return Failure(error)


def _master_protocol(base: Any) -> type:
    """*base* (a txredisapi protocol class) that accepts only a master: ``ROLE`` at
    connect, and a ``READONLY`` reply later, close a connection to anything else."""
    import txredisapi

    class MasterProtocol(base):  # type: ignore[misc]
        connected: int

        def connectionMade(self) -> Any:
            checked: Deferred[Any] = succeed(None)
            if self.password is not None:
                checked = self.auth(self.password, self.username)
            checked.addErrback(lambda _: None)  # the base class reports a bad password
            checked.addCallback(lambda _: self.execute_command("ROLE"))
            return checked.addCallbacks(self._role, lambda _: base.connectionMade(self))

        def _role(self, role: Any) -> Any:
            kind = role[0] if isinstance(role, list | tuple) and role else None
            if isinstance(kind, bytes):
                kind = kind.decode()
            if kind == "master":
                return base.connectionMade(self)
            peer = self.transport.getPeer()
            _log.warn(
                "Redis at {host}:{port} is a {role}, not the master: reconnecting",
                host=getattr(peer, "host", "?"),
                port=getattr(peer, "port", "?"),
                role=kind,
            )
            self.transport.loseConnection()
            return None

        def replyReceived(self, reply: Any) -> None:  # noqa: N802 (txredisapi's name)
            readonly = isinstance(reply, txredisapi.ResponseError) and str(reply).startswith(
                "READONLY"
            )
            if readonly and self.transport is not None and self.connected:
                _log.warn(
                    "Redis answered READONLY (the master was demoted): dropping the "
                    "connection to find the new master"
                )
                self.connected = 0
                self.transport.loseConnection()
            super().replyReceived(reply)

    return MasterProtocol


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """An endpoint that discovers the master before every connection
    attempt; when the master moved, it closes the pool's connections to the old one."""

    def __init__(
        self,
        discovery: MasterDiscovery,
        factory: Any,
        *,
        connect_timeout: float,
        tls: bool,
        service: str,
    ) -> None:
        self.discovery = discovery
        self.factory = factory
        self.connect_timeout = connect_timeout
        self.tls = tls
        self.service = service
        self.master: tuple[str, int] | None = None
        self._failing = False

    def connect(self, protocol_factory: Any) -> Deferred[Any]:
        d = self.discovery.discover()
        d.addCallbacks(self._found, self._not_found)
        d.addCallback(self._connect, protocol_factory)
        return d

    def _found(self, address: tuple[str, int]) -> tuple[str, int]:
        if self._failing or (self.master is not None and address != self.master):
            _log.info(
                "Redis master of {service} is {host}:{port} (was {old})",
                service=self.service,
                host=address[0],
                port=address[1],
                old="unknown" if self.master is None else f"{self.master[0]}:{self.master[1]}",
            )
        if self.master is not None and address != self.master:
            for connection in list(self.factory.pool):
                connection.transport.loseConnection()
        self._failing = False
        self.master = address
        return address

    def _not_found(self, failure: Failure) -> Failure:
        if not self._failing:
            self._failing = True
            _log.warn("Redis master unknown: {why}", why=failure.getErrorMessage())
        return failure

    def _connect(self, address: tuple[str, int], protocol_factory: Any) -> Any:
        import txredisapi

        context: Any = None
        if self.tls:
            from twisted.internet import ssl

            context = ssl.ClientContextFactory()
        endpoint = txredisapi._makeEndpoint(address[0], address[1], self.connect_timeout, context)
        return endpoint.connect(protocol_factory)


def sentinel_connection(
    address: SentinelAddress,
    *,
    reply_timeout: float | None,
    connect_timeout: float = 5.0,
    charset: str | None = "utf-8",
    poolsize: int = 1,
    protocol: type | None = None,
    clock: IReactorTime | None = None,
) -> RedisConnection:
    """A lazy txredisapi connection (pool) to the master of *address*'s service.

    Besides the txredisapi API, the handler has ``master()``: the master's
    ``(host, port)`` while a connection to it is up, else None (``/readyz``).

    :param protocol: the txredisapi protocol class to build on (the processor's fast
        reader passes its own); txredisapi's default otherwise.
    """
    import txredisapi

    if clock is None:
        from twisted.internet import reactor as clock
    assert clock is not None
    sentinels = [
        _sentinel_connection(host, port, address, min(connect_timeout, ASK_TIMEOUT))
        for host, port in address.sentinels
    ]

    def ask(index: int) -> Deferred[Reply]:
        return sentinels[index].execute_command("SENTINEL", "MASTER", address.service)

    discovery = MasterDiscovery(ask, len(sentinels), address.service, clock)

    class Factory(txredisapi.RedisFactory):  # type: ignore[misc]
        initialDelay = 0.1  # noqa: N815 (txredisapi's name)

        def retryDelay(self, attempt: int) -> float:  # noqa: N802 (txredisapi's name)
            if attempt <= 1:
                return 0.0  # the address is rediscovered on every attempt
            return float(min(RECONNECT_MAX_DELAY, super().retryDelay(attempt)))

    Factory.protocol = _master_protocol(protocol or txredisapi.RedisProtocol)
    factory = Factory(
        None,
        address.db,
        poolsize,
        True,  # lazy
        SentinelConnectionHandler,
        charset,
        address.password,
        reply_timeout,
        False,  # convertNumbers
        address.username,
    )
    factory.reconnect = True
    endpoint = SentinelEndpoint(
        discovery,
        factory,
        connect_timeout=connect_timeout,
        tls=address.tls,
        service=address.service,
    )
    handler: SentinelConnectionHandler = factory.handler
    handler._endpoint = endpoint
    handler._sentinels = sentinels
    connected = getattr(factory, "deferred", None)
    if connected is not None:
        connected.addErrback(lambda failure: None)  # commands report their own failures
    factory.startConnecting(endpoint)
    typed: RedisConnection = handler  # its base is untyped txredisapi: typed from here on
    return typed


def _sentinel_connection(
    host: str, port: int, address: SentinelAddress, connect_timeout: float
) -> RedisConnection:
    """A lazy connection to one sentinel (no SELECT: a sentinel has no databases)."""
    import txredisapi

    connection = txredisapi.makeConnection(
        host,
        port,
        None,  # dbid
        1,
        True,  # reconnect
        True,  # lazy
        "utf-8",
        address.sentinel_password,
        address.tls,
        connect_timeout,
        ASK_TIMEOUT,
        False,  # convertNumbers
    )
    connected = getattr(getattr(connection, "_factory", None), "deferred", None)
    if connected is not None:
        connected.addErrback(lambda failure: None)  # questions report their own failures
    typed: RedisConnection = connection  # txredisapi is untyped: typed from here on
    return typed


def _handler_base() -> type:
    import txredisapi

    base: type = txredisapi.ConnectionHandler
    return base


class SentinelConnectionHandler(_handler_base()):  # type: ignore[misc]
    """txredisapi's connection handler, plus :meth:`master` and the sentinels' cleanup."""

    _endpoint: SentinelEndpoint | None = None
    _sentinels: Sequence[RedisConnection] = ()

    def master(self) -> tuple[str, int] | None:
        """The master's address while a connection to it is up; None while no master
        is known (a failover, every sentinel unreachable)."""
        endpoint = self._endpoint
        if endpoint is None or self._factory.size == 0:
            return None
        return endpoint.master

    def disconnect(self) -> Deferred[Any]:
        closing = [self._factory.disconnect()]
        closing += [sentinel.disconnect() for sentinel in self._sentinels]
        return gatherResults(closing, consumeErrors=True)

    def __repr__(self) -> str:
        endpoint = self._endpoint
        master = endpoint.master if endpoint is not None else None
        return f"<Redis through Sentinel: master {master}, {self._factory.size} connection(s)>"


def master_known(connection: RedisConnection) -> bool:
    """For ``/readyz``: True unless *connection* follows Sentinel and knows no master.

    A type check, not ``hasattr``: txredisapi's handler turns any attribute it lacks into
    a command."""
    if not isinstance(connection, SentinelConnectionHandler):
        return True
    return connection.master() is not None
