"""The device session driven directly, without a Protocol: its lifecycle, the one place
that guards it, and what it asks of its socket."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from zope.interface import implementer
from zope.interface.verify import verifyObject

from teltonika.interfaces import IDeviceSocket
from teltonika.protocol.session import (
    TRANSITIONS,
    DeviceSession,
    SessionState,
    SessionStateError,
)
from teltonika.protocol.tcp import TransportSocket
from teltonika.wire import Framer, tcp_ack
from tests.helpers import IMEI, LOGIN, ControlledSink, Harness, avl_frame


@implementer(IDeviceSocket)
class RecordingSocket:
    """Records what the session asks of its connection."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")

    def peer(self) -> str:
        return "192.0.2.1:4000"


class PendingAuthority:
    def __init__(self) -> None:
        self.pending: list[Deferred[bool]] = []

    def is_allowed(self, imei: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.pending.append(d)
        return d


def feed(session: DeviceSession, framer: Framer, data: bytes) -> None:
    """What DeviceProtocol.dataReceived does."""
    session.data_received(data, framer.feed(data))


def state_of(session: DeviceSession) -> SessionState:
    """The session's state, read through a call: mypy would carry each ``session.state is``
    narrowing past the calls that move the state on."""
    return session.state


def test_a_session_lives_through_every_state_in_order() -> None:
    """Login with a slow authority, a frame, a shutdown: AWAITING_LOGIN, AUTHORIZING (reading
    paused), LOGGED_IN (reading resumed, 01 then the ACK), DRAINING (paused again), CLOSING
    (the socket closed), CLOSED (logged out, no timer left). No Protocol is involved."""
    authority = PendingAuthority()
    h = Harness(authority=authority)
    socket = RecordingSocket()
    framer = Framer(login_first=True)
    session = DeviceSession(socket, h.factory, lambda: framer.buffered)
    session.connection_made()
    assert state_of(session) is SessionState.AWAITING_LOGIN
    assert h.factory.connections == {session}

    feed(session, framer, LOGIN)
    assert state_of(session) is SessionState.AUTHORIZING
    assert socket.calls == ["pause"] and socket.written == b""
    authority.pending[0].callback(True)
    assert state_of(session) is SessionState.LOGGED_IN
    assert socket.calls == ["pause", "resume"]
    assert h.factory.sessions == {IMEI: session} and session.imei == IMEI

    feed(session, framer, avl_frame(2))
    assert socket.written == b"\x01" + tcp_ack(2)

    session.stop_reading()
    assert state_of(session) is SessionState.DRAINING
    assert socket.calls[-1] == "pause"
    session.close()
    assert state_of(session) is SessionState.CLOSING
    assert socket.calls[-1] == "close"
    session.connection_lost()
    assert state_of(session) is SessionState.CLOSED
    assert h.factory.sessions == {} and h.factory.connections == set()
    assert h.clock.getDelayedCalls() == []


def test_a_drain_that_begins_while_the_login_is_decided_stays_a_drain() -> None:
    """A shutdown that starts while the authority decides: the login is still answered and
    the frame read with it is still stored and ACKed, but reading never resumes."""
    authority = PendingAuthority()
    sink = ControlledSink()
    h = Harness(sink=sink, authority=authority)
    socket = RecordingSocket()
    framer = Framer(login_first=True)
    session = DeviceSession(socket, h.factory, lambda: framer.buffered)
    session.connection_made()
    feed(session, framer, LOGIN + avl_frame(1))
    session.stop_reading()
    assert session.state is SessionState.DRAINING
    authority.pending[0].callback(True)
    assert session.state is SessionState.DRAINING
    assert session.imei == IMEI
    assert socket.written == b"\x01" + tcp_ack(1)
    assert "resume" not in socket.calls


def test_a_refused_connection_is_aborted_and_closing() -> None:
    """Beyond max_connections the session aborts its socket at once and reads nothing."""
    h = Harness(max_connections=1)
    h.connect()
    socket = RecordingSocket()
    session = DeviceSession(socket, h.factory)
    session.connection_made()
    assert session.state is SessionState.CLOSING
    assert socket.calls == ["abort"]
    session.data_received(LOGIN, iter(()))
    assert socket.written == b""


def test_an_impossible_transition_raises_and_is_logged(logged_errors: Any) -> None:
    """A lifecycle change TRANSITIONS does not allow is a bug: it raises
    SessionStateError and logs a critical event (in case a caller swallows it)."""
    h = Harness()
    session = DeviceSession(RecordingSocket(), h.factory)
    session.connection_made()
    session.connection_lost()
    with pytest.raises(SessionStateError, match="CLOSED -> CLOSED"):
        session.connection_lost()
    with pytest.raises(SessionStateError, match="CLOSED -> LOGGED_IN"):
        session._enter(SessionState.LOGGED_IN)
    events = logged_errors.flush()
    assert [(e["old"], e["new"]) for e in events] == [
        ("CLOSED", "CLOSED"),
        ("CLOSED", "LOGGED_IN"),
    ]


def test_the_transition_table_is_the_documented_lifecycle() -> None:
    """AWAITING_LOGIN -> AUTHORIZING -> LOGGED_IN -> DRAINING -> CLOSING -> CLOSED: each
    state can end the session, nothing leaves CLOSED, and nothing goes back to an earlier
    state."""
    order = list(SessionState)
    assert order == [
        SessionState.AWAITING_LOGIN,
        SessionState.AUTHORIZING,
        SessionState.LOGGED_IN,
        SessionState.DRAINING,
        SessionState.CLOSING,
        SessionState.CLOSED,
    ]
    assert set(TRANSITIONS) == set(order)
    assert TRANSITIONS[SessionState.CLOSED] == frozenset()
    for state, targets in TRANSITIONS.items():
        assert all(order.index(target) > order.index(state) for target in targets)
        if state is not SessionState.CLOSED:
            assert SessionState.CLOSED in targets


def test_transport_socket_provides_the_interface() -> None:
    """The production socket adapter carries out each call on the transport."""
    transport = StringTransport()
    socket = TransportSocket(transport)
    assert verifyObject(IDeviceSocket, socket)
    assert verifyObject(IDeviceSocket, RecordingSocket())
    socket.write(b"\x01")
    socket.pause()
    assert transport.producerState == "paused"
    socket.resume()
    assert transport.producerState == "producing"
    socket.close()
    assert transport.disconnecting and transport.disconnected == False  # noqa: E712 (`not` would narrow it for mypy past the next call)
    socket.abort()
    assert transport.disconnected
    assert transport.value() == b"\x01"
    assert socket.peer() == "192.168.1.1:54321"
