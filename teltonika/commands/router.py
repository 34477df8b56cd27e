"""Connects device sessions to the command plane: registry entries and offline delivery.

The ingestion Factory tells every :class:`~teltonika.interfaces.ISessionListener` about
logins and logouts; this one registers the IMEI in ``connections:registry`` (after the
login succeeded, never on the per-frame path) and moves the device's waiting offline
commands into this instance's stream, and it unregisters the IMEI at logout.
"""

from __future__ import annotations

from zope.interface import implementer

from teltonika.commands.consumer import CommandConsumer
from teltonika.commands.registry import ConnectionRegistry
from teltonika.interfaces import ISessionListener


@implementer(ISessionListener)
class CommandRouter:
    """The command plane's session listener.

    :param registry: the connection registry (None: commands are not routed here).
    :param consumer: the consumer that delivers offline commands (None: no offline delivery).
    """

    def __init__(
        self, registry: ConnectionRegistry | None, consumer: CommandConsumer | None
    ) -> None:
        self.registry = registry
        self.consumer = consumer

    def device_logged_in(self, imei: str, session: object) -> None:
        """ISessionListener API"""
        if self.registry is not None:
            self.registry.register(imei)
        if self.consumer is not None:
            self.consumer.take_offline(imei)

    def device_logged_out(self, imei: str, session: object) -> None:
        """ISessionListener API"""
        if self.registry is not None:
            self.registry.unregister(imei)
