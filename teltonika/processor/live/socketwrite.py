"""Writing a message's parts straight to the socket while Twisted has nothing queued.

Twisted's TCP transport never sends in ``write``: it queues the bytes, registers the
socket for writability (an ``epoll_ctl``), joins its queue into one ``bytes`` on the next
reactor turn, sends, and unregisters (another ``epoll_ctl``). A broadcast of one message
to 1,000 clients ten times a second is then 20,000 ``epoll_ctl`` calls, 10,000 copies of
the message and a Python write path per client and message, on top of the ``send``
itself; ``benchmarks/live.py --profile`` showed that path costing more than the
broadcast's own code.

:class:`DirectWriter` sends with one ``sendmsg`` whose iovec is the parts (the positions
array shared by every subscriber of an event is never copied in user space) when the
transport's buffers are empty, and hands whatever the kernel did not take to the
transport. Once anything is queued, everything goes through the transport until its
buffers are empty again, so bytes never overtake each other; a client that stops reading
fills its send buffer, the transport queues the rest and pauses its producer, exactly as
before: backpressure (conflation, eviction) is unchanged. A transport that is not
Twisted's plain TCP connection (TLS, a test's ``StringTransport``) always gets
``writeSequence``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class DirectWriter:
    """Writes to *transport*, bypassing its queue when it is empty (module docstring)."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.socket = _plain_socket(transport)

    def write(self, parts: Sequence[bytes], size: int) -> None:
        """Write *parts* (*size* bytes in all) in order after everything written before."""
        transport = self.transport
        sock = self.socket
        if (
            sock is not None
            and not transport.TLS
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._tempDataLen
            and len(transport.dataBuffer) == transport.offset
        ):
            try:
                sent = sock.sendmsg(parts)
            except OSError:  # full (EAGAIN) or broken: the transport finds out on its own
                sent = 0
            if sent >= size:
                return
            parts = _after(parts, sent)
        transport.writeSequence(parts)


def _plain_socket(transport: Any) -> Any:
    """The socket under *transport* when it is Twisted's TCP connection without TLS."""
    from twisted.internet import tcp

    if not isinstance(transport, tcp.Connection):
        return None
    if not all(
        hasattr(transport, name)
        for name in ("TLS", "dataBuffer", "offset", "_tempDataLen", "_writeDisconnected")
    ):
        return None  # a Twisted whose buffers we do not know: never bypass them
    return transport.getHandle()


def _after(parts: Sequence[bytes], sent: int) -> list[bytes]:
    """What is left of *parts* once the first *sent* bytes went out."""
    rest: list[bytes] = []
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
            continue
        rest.append(part[sent:] if sent else part)
        sent = 0
    return rest
