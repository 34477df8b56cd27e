"""The seams of the server. Each interface's docstrings are its contract.

Implementations are found in three ways: codecs through ``twisted.plugin`` (so a
deployment can add one from a dropin file), sinks and device authorities by the
``twistd teltonika`` options, and everything through constructor arguments in tests.

Interface methods are declared without ``self``, as zope.interface requires. mypy-zope
checks implementers' method signatures but not ``Attribute`` types, so each attribute's
docstring gives its type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
)
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from teltonika.wire.records import AVLRecord, Packet


class ICodec(Interface):
    """One Teltonika codec: decodes the body of a frame whose codec id byte it owns.

    The body is the CRC-covered region: codec id through Number of Data 2. The same
    body appears inside TCP frames and (for AVL codecs) inside UDP datagrams.
    """

    codec_id = Attribute("int: the codec id byte (offset 8 of a TCP frame), e.g. 0x8E.")
    name = Attribute("str: the short name used in logs, metrics and the record contract: '8E'.")
    kind = Attribute("str: 'avl' for position records, 'message' for codec 12/13/14 messages.")

    def decode(data: bytes, start: int, end: int) -> Packet:
        """Decode the body ``data[start:end]``.

        Error offsets name positions in *data*.

        :raise teltonika.wire.errors.DecodeError: the only exception that may escape,
            whatever the bytes.
        """

    def encode(packet: Packet) -> bytes:
        """Encode *packet* as a body (the inverse of :meth:`decode`)."""

    def acknowledgement(packet: Packet) -> bytes | None:
        """The bytes to answer a *stored* packet with on TCP, or None for never.

        AVL codecs answer with the record count as a u32. Codec 12/13/14 device messages
        are never acknowledged (devices log errors when they are).
        """


class ISink(Interface):
    """Where decoded records go. The server ACKs a frame only when :meth:`publish` fires.

    A sink promises that when the Deferred fires successfully every record is durable to
    the degree the sink documents (Redis memory, Redis AOF fsync, a fsynced file). If it
    fails, nothing may be assumed stored: the device is not ACKed and resends.
    """

    name = Attribute("str: short name for logs and metrics ('redis', 'file').")

    def publish(
        imei: str, codec_name: str, records: tuple[AVLRecord, ...], received_at_ms: int
    ) -> Deferred[None]:
        """Store *records* of one frame from *imei*; fire when they are durable."""

    def publish_message(imei: str, message: dict[str, str]) -> Deferred[None]:
        """Store one device message (codec 12/13/14 that resolved no command)."""

    def ready() -> bool:
        """True while the sink believes it can store records (drives ``/readyz``)."""


class IManagedSink(ISink):
    """A sink with a lifecycle, started and closed by the ingestion service
    (``teltonika.services.ingestion.IngestionService``); every sink the server runs is one.

    The service calls :meth:`start` once after the listeners bound and before frames are
    expected, and :meth:`close` once during shutdown, after every connection closed (so no
    :meth:`~ISink.publish` comes after it). Both are ``async`` methods: the service awaits
    them, :meth:`close` within ``--shutdown-timeout``.
    """

    async def start() -> None:
        """Open the store and check it gives what the sink promises (the Redis sink's
        ``--redis-durability`` check, the file sink's open and lock).

        :raise Exception: the sink cannot run; the server refuses to start (exit status 1)
            with the exception's message.
        """

    async def close() -> None:
        """Store what is queued (a last group commit / pipeline), then release what the
        sink opened itself (a connection the caller handed in stays the caller's)."""


class IDeviceAuthority(Interface):
    """Decides whether a device may log in."""

    def is_allowed(imei: str) -> Deferred[bool]:
        """Fire with True when *imei* may log in. A failure counts as a refusal."""


class IDeviceSocket(Interface):
    """What a device session needs of its TCP connection, and nothing more.

    The session (``teltonika.protocol.session.DeviceSession``) decides; this only carries
    out. Production wraps the Twisted transport
    (``teltonika.protocol.tcp.TransportSocket``); tests may record the calls.
    """

    def write(data: bytes) -> None:
        """Send *data* after everything written before."""

    def pause() -> None:
        """Read nothing more from the device until :meth:`resume`."""

    def resume() -> None:
        """Read from the device again."""

    def close() -> None:
        """Close once what was written has been sent."""

    def abort() -> None:
        """Close at once, dropping whatever was not sent yet."""

    def peer() -> str:
        """The device's address for log events (``host:port``). Asked at each event:
        behind a PROXY-protocol balancer it is known only once the header is parsed."""


class ISessionListener(Interface):
    """Told when a device logs in on this instance and when that session ends.

    The ingestion Factory calls every listener in its ``session_listeners`` list; the
    command router and the connection registry subscribe here. A listener must not raise
    (an exception is logged and ignored) and must not block.
    """

    def device_logged_in(imei: str, session: object) -> None:
        """*session* (a ``teltonika.protocol.session.DeviceSession``) now owns *imei*."""

    def device_logged_out(imei: str, session: object) -> None:
        """*session* no longer owns *imei* (connection closed or replaced by a newer one)."""


class IProcessReactor(IReactorCore, IReactorTime, IReactorFromThreads, IReactorTCP, IReactorUDP):
    """What a ``twistd`` service tree needs of its reactor: the global reactor in a real
    process, a ``MemoryReactorClock`` (or one that also runs calls from threads) in tests."""
