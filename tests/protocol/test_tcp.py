"""The device Protocol driven by StringTransport and Clock: no reactor, no sleeps."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.haproxy import proxyEndpoint
from zope.interface import implementer

from teltonika.interfaces import ISessionListener
from teltonika.logs import HEX_LOG_BYTES
from teltonika.wire import (
    CODEC_8,
    CODEC_12,
    CODEC_16,
    MESSAGE_TYPE_RESPONSE,
    encode_login,
    encode_message,
    tcp_ack,
    wrap,
)
from tests.helpers import (
    IMEI,
    LOGIN,
    OTHER_IMEI,
    ControlledSink,
    Harness,
    PendingAuthority,
    SetAuthority,
    avl_frame,
)


def test_login_accepted_registers_session() -> None:
    """A valid IMEI gets 01, becomes a session and counts logins{result=accepted}."""
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(LOGIN)
    assert transport.value() == b"\x01"
    assert not transport.disconnecting
    assert h.factory.sessions == {IMEI: proto.session}
    assert proto.session.imei == IMEI
    assert h.sample("teltonika_logins_total", result="accepted") == 1
    assert h.sample("teltonika_connections_open") == 1


def test_invalid_imei_rejected_and_closed() -> None:
    """A login packet that is not 15 digits gets 00 and the connection closes."""
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(b"\x00\x0f" + b"35630704244101X")
    assert transport.value() == b"\x00"
    assert transport.disconnecting
    assert h.sample("teltonika_logins_total", result="invalid") == 1
    assert h.factory.sessions == {}


def test_luhn_option() -> None:
    """With luhn on, an IMEI with a wrong check digit is refused; a valid one is not."""
    h = Harness(luhn=True)
    proto, transport = h.connect()
    proto.dataReceived(encode_login("356307042441014"))
    assert transport.value() == b"\x00"
    proto, transport = h.connect()
    proto.dataReceived(encode_login("490154203237518"))  # a Luhn-valid IMEI
    assert transport.value() == b"\x01"


def test_authority_refusal() -> None:
    """An IMEI the authority does not know gets 00, then the connection closes."""
    h = Harness(authority=SetAuthority({OTHER_IMEI}))
    proto, transport = h.connect()
    proto.dataReceived(LOGIN)
    assert transport.value() == b"\x00"
    assert transport.disconnecting
    assert h.sample("teltonika_logins_total", result="rejected") == 1


def test_authority_failure_counts_as_refusal(logged_errors: Any) -> None:
    """A failing authority refuses the login and logs an error."""
    h = Harness(authority=SetAuthority(error=RuntimeError("redis down")))
    proto, transport = h.connect()
    proto.dataReceived(LOGIN)
    assert transport.value() == b"\x00"
    assert transport.disconnecting
    assert h.sample("teltonika_logins_total", result="error") == 1
    assert len(logged_errors.flush()) == 1


def test_failing_lookups_are_logged_rate_limited(logged_errors: Any) -> None:
    """Redis down while a fleet reconnects: every login's lookup fails, and each is
    refused and counted, but one error event per interval is logged (with how many were
    left out), not one per login."""
    h = Harness(authority=SetAuthority(error=RuntimeError("redis down")))
    for _ in range(50):
        proto, transport = h.connect()
        proto.dataReceived(LOGIN)
        assert transport.value() == b"\x00"
    assert h.sample("teltonika_logins_total", result="error") == 50
    [first] = logged_errors.flush()
    assert first["suppressed"] == 0 and first["error"] == "redis down"
    h.clock.advance(h.factory.limited_log.interval)
    proto, _ = h.connect()
    proto.dataReceived(LOGIN)
    [second] = logged_errors.flush()
    assert second["suppressed"] == 49


def test_no_more_reads_while_the_login_is_being_decided() -> None:
    """The framer lets data frames through once the IMEI packet is cut, so while a slow
    authority decides, a peer not yet admitted could make the server hold frames (8
    queued, up to 64 KiB each, on each of up to 1,000 pending lookups). Reading pauses
    until the decision: the frames that came in the login's own read are kept and
    handled once the login is accepted; nothing more is read before."""
    authority = PendingAuthority()
    h = Harness(authority=authority)
    proto, transport = h.connect()
    proto.dataReceived(LOGIN + avl_frame(1))
    assert transport.producerState == "paused"
    assert transport.value() == b""
    assert h.sample("teltonika_backlog_pauses_total") == 0  # not a backlog
    [lookup] = authority.pending
    lookup.callback(True)
    assert transport.producerState == "producing"
    assert transport.value() == b"\x01" + tcp_ack(1)


def test_a_refused_login_reads_nothing_more() -> None:
    authority = PendingAuthority()
    h = Harness(authority=authority)
    proto, transport = h.connect()
    proto.dataReceived(LOGIN)
    assert transport.producerState == "paused"
    authority.pending[0].callback(False)
    assert transport.value() == b"\x00" and transport.disconnecting
    assert transport.producerState == "paused"


def test_a_pending_login_and_a_backlog_both_keep_reading_paused() -> None:
    """The login's pause and the backlog's pause do not undo each other: a backlog that
    formed in the login's read keeps reading paused after the login is accepted, until
    the queue drains."""
    authority = PendingAuthority()
    sink = ControlledSink(auto=False)
    h = Harness(sink=sink, authority=authority, max_pending_frames=2)
    proto, transport = h.connect()
    proto.dataReceived(LOGIN + b"".join(avl_frame(1, start=i) for i in range(4)))
    assert transport.producerState == "paused"
    authority.pending[0].callback(True)
    assert transport.producerState == "paused"  # 3 frames still queued
    for i in range(4):
        sink.calls[i][-1].callback(None)
    assert transport.producerState == "producing"
    assert transport.value() == b"\x01" + tcp_ack(1) * 4


def test_frames_split_byte_by_byte() -> None:
    """Login and frame delivered one byte per read give exactly one 01 and one ACK."""
    h = Harness()
    proto, transport = h.connect()
    for byte in LOGIN + avl_frame(3):
        proto.dataReceived(bytes([byte]))
    assert transport.value() == b"\x01" + tcp_ack(3)
    assert len(h.sink.calls) == 1


def test_merged_frames_in_one_read_acked_in_order() -> None:
    """Login plus three frames in one read: three ACKs, in frame order."""
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(LOGIN + avl_frame(1) + avl_frame(2) + avl_frame(3, codec_id=CODEC_8))
    assert transport.value() == b"\x01" + tcp_ack(1) + tcp_ack(2) + tcp_ack(3)
    assert [c[1] for c in h.sink.calls] == ["8E", "8E", "8"]
    assert h.sample("teltonika_records_total", codec="8E") == 3
    assert h.sample("teltonika_frames_total", codec="8") == 1
    assert h.sample("teltonika_acks_total", transport="tcp") == 3


def test_keepalives_anywhere_get_no_reply() -> None:
    """FF before the login, between frames and on its own is consumed silently."""
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(b"\xff" + LOGIN + b"\xff\xff")
    proto.dataReceived(avl_frame(1) + b"\xff")
    proto.dataReceived(b"\xff")
    assert transport.value() == b"\x01" + tcp_ack(1)
    assert not transport.disconnecting
    assert h.sample("teltonika_keepalives_total") == 5


def test_ack_withheld_until_sink_fires() -> None:
    """No ACK is written until the sink's Deferred fires; then exactly the count."""
    sink = ControlledSink(auto=False)
    h = Harness(sink=sink)
    proto, transport = h.login()
    proto.dataReceived(avl_frame(2))
    assert transport.value() == b""
    assert len(sink.calls) == 1
    imei, codec, records, _received_at_ms, d = sink.calls[0]
    assert (imei, codec, len(records)) == (IMEI, "8E", 2)
    h.clock.advance(0.25)
    d.callback(None)
    assert transport.value() == tcp_ack(2)
    assert h.sample("teltonika_sink_latency_seconds_count", sink="test") == 1
    assert h.sample("teltonika_sink_latency_seconds_sum", sink="test") == 0.25


def test_sink_failure_means_no_ack_and_close(logged_errors: Any) -> None:
    """A failed publish writes no ACK, logs an error, counts it and closes."""
    sink = ControlledSink(auto=False)
    h = Harness(sink=sink)
    proto, transport = h.login()
    proto.dataReceived(avl_frame(1) + avl_frame(1, start=5))
    sink.calls[0][4].errback(RuntimeError("disk full"))
    assert transport.value() == b""
    assert transport.disconnecting
    assert len(sink.calls) == 1  # the frame behind it is dropped: the device resends it
    assert h.sample("teltonika_sink_failures_total", sink="test") == 1
    [event] = logged_errors.flush()
    assert event["count"] == 1 and event["imei"] == IMEI


def test_sink_timeout_means_no_ack_and_close(logged_errors: Any) -> None:
    """A publish that never fires times out after sink_timeout: no ACK, closed."""
    sink = ControlledSink(auto=False)
    h = Harness(sink=sink, sink_timeout=5.0)
    proto, transport = h.login()
    proto.dataReceived(avl_frame(1))
    h.clock.advance(4.9)
    assert transport.disconnecting == False  # noqa: E712 (`not` would narrow it for mypy past the next call)
    h.clock.advance(0.2)
    assert transport.disconnecting
    assert transport.value() == b""
    assert len(logged_errors.flush()) == 1


def test_frames_processed_strictly_in_order_with_slow_sink() -> None:
    """The second frame reaches the sink only after the first one was stored and ACKed."""
    sink = ControlledSink(auto=False)
    h = Harness(sink=sink)
    proto, transport = h.login()
    proto.dataReceived(avl_frame(1) + avl_frame(2))
    assert len(sink.calls) == 1
    sink.calls[0][4].callback(None)
    assert transport.value() == tcp_ack(1)
    assert len(sink.calls) == 2
    sink.calls[1][4].callback(None)
    assert transport.value() == tcp_ack(1) + tcp_ack(2)


def test_backlog_pauses_and_resumes_reading() -> None:
    """Too many queued frames pause the transport; draining them resumes it."""
    sink = ControlledSink(auto=False)
    h = Harness(sink=sink, max_pending_frames=2)
    proto, transport = h.login()
    proto.dataReceived(avl_frame(1))
    assert transport.producerState == "producing"
    proto.dataReceived(avl_frame(1) + avl_frame(1) + avl_frame(1))
    assert transport.producerState == "paused"
    assert h.sample("teltonika_backlog_pauses_total") == 1
    for i in range(4):
        sink.calls[i][4].callback(None)
    assert transport.producerState == "producing"
    assert transport.value() == tcp_ack(1) * 4


def test_login_timeout() -> None:
    """No login within login_timeout closes the connection; a login in time does not."""
    h = Harness(login_timeout=30.0)
    _proto, transport = h.connect()
    h.clock.advance(29.9)
    assert transport.disconnecting == False  # noqa: E712 (`not` would narrow it for mypy past the next call)
    h.clock.advance(0.2)
    assert transport.disconnecting
    assert h.sample("teltonika_timeouts_total", kind="login") == 1
    _proto2, transport2 = h.login()
    h.clock.advance(31)
    assert not transport2.disconnecting


def test_idle_timeout_reset_by_any_byte() -> None:
    """Any byte (a keepalive too) restarts the idle timer; silence closes."""
    h = Harness(idle_timeout=60.0)
    proto, transport = h.login()
    h.clock.advance(59)
    proto.dataReceived(b"\xff")
    h.clock.advance(59)
    assert transport.disconnecting == False  # noqa: E712 (`not` would narrow it for mypy past the next call)
    h.clock.advance(2)
    assert transport.disconnecting
    assert h.sample("teltonika_timeouts_total", kind="idle") == 1


def test_connection_lost_cancels_timers() -> None:
    """A closed connection leaves no timer behind."""
    h = Harness()
    proto, _transport = h.login()
    proto.connectionLost()
    assert h.clock.getDelayedCalls() == []
    assert h.factory.sessions == {}
    assert h.sample("teltonika_connections_open") == 0


def test_oversize_frame_closes_before_buffering() -> None:
    """A data length above max_frame closes at once and counts reason=length."""
    h = Harness(max_frame=1024)
    proto, transport = h.login()
    proto.dataReceived(b"\x00\x00\x00\x00" + (2000).to_bytes(4, "big") + b"\x8e")
    assert transport.disconnecting
    assert transport.value() == b""
    assert h.sample("teltonika_decode_errors_total", reason="length") == 1


def test_corrupt_crc_no_ack_and_closed() -> None:
    """A frame whose CRC does not match is never ACKed nor published; it closes."""
    h = Harness()
    proto, transport = h.login()
    frame = bytearray(avl_frame(1))
    frame[-1] ^= 0xFF
    with capturedLogs() as events:
        proto.dataReceived(bytes(frame))
    assert transport.value() == b""
    assert transport.disconnecting
    assert h.sink.calls == []
    assert h.sample("teltonika_decode_errors_total", reason="crc") == 1
    [event] = [e for e in events if e.get("event") == "rejected_frame"]
    assert event["reason"] == "crc"
    assert event["hex"] == bytes(frame).hex()


def test_rejected_frame_hex_is_truncated() -> None:
    """The log event of a large rejected frame shows only HEX_LOG_BYTES of it."""
    h = Harness()
    proto, _transport = h.login()
    frame = bytearray(avl_frame(10))
    frame[-1] ^= 0xFF
    with capturedLogs() as events:
        proto.dataReceived(bytes(frame))
    [event] = [e for e in events if e.get("event") == "rejected_frame"]
    assert event["hex"].startswith(bytes(frame[:HEX_LOG_BYTES]).hex())
    assert event["hex"].endswith(f"(+{len(frame) - HEX_LOG_BYTES} bytes)")


def test_unknown_codec_closes() -> None:
    """A well-framed frame with a codec no plugin handles: no ACK, reason=unknown_codec."""
    h = Harness()
    proto, transport = h.login()
    proto.dataReceived(wrap(bytes([0x42, 1, 0, 0, 0, 0, 0, 0, 1])))
    assert transport.value() == b""
    assert transport.disconnecting
    assert h.sample("teltonika_decode_errors_total", reason="unknown_codec") == 1


def test_tls_client_hello_closes() -> None:
    """A TLS ClientHello on the plain port is a framing error: closed, counted."""
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert transport.disconnecting
    assert transport.value() == b""
    assert h.sample("teltonika_decode_errors_total", reason="length") == 1


def test_data_before_login_closes() -> None:
    """A data frame before a successful login is never published: closed."""
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(avl_frame(1))
    assert transport.disconnecting
    assert transport.value() == b""
    assert h.sink.calls == []
    assert h.sample("teltonika_decode_errors_total", reason="before_login") == 1


def test_repeated_same_imei_answered_again() -> None:
    """The same IMEI again mid-session is answered 01 and the session goes on."""
    h = Harness()
    proto, transport = h.login()
    proto.dataReceived(LOGIN + avl_frame(1))
    assert transport.value() == b"\x01" + tcp_ack(1)
    assert not transport.disconnecting


def test_different_imei_mid_session_rejected() -> None:
    """A different IMEI mid-session gets 00 and the connection closes."""
    h = Harness()
    proto, transport = h.login()
    proto.dataReceived(encode_login(OTHER_IMEI))
    assert transport.value() == b"\x00"
    assert transport.disconnecting
    assert h.sample("teltonika_decode_errors_total", reason="imei_changed") == 1


def test_device_message_published_not_acked_connection_usable() -> None:
    """An unsolicited codec 12 response goes to publish_message, is never ACKed, and
    the connection still ACKs the next AVL frame."""
    h = Harness()
    proto, transport = h.login()
    message = wrap(encode_message(CODEC_12, b"weight=12.5kg\r\n", MESSAGE_TYPE_RESPONSE))
    proto.dataReceived(message)
    assert transport.value() == b""
    assert not transport.disconnecting
    [(imei, fields, _)] = h.sink.messages
    assert imei == IMEI
    assert fields["codec"] == "12" and fields["text"] == "weight=12.5kg\r\n"
    assert fields["type"] == str(MESSAGE_TYPE_RESPONSE)
    proto.dataReceived(avl_frame(1, codec_id=CODEC_16))
    assert transport.value() == tcp_ack(1)
    assert h.sample("teltonika_device_messages_total", codec="12") == 1


def test_device_message_sink_timeout_is_counted_and_keeps_the_connection(
    logged_errors: Any,
) -> None:
    """A device message the sink never stores times out after sink_timeout, as records
    do: counted as a sink failure and logged, but nothing is written and the connection
    stays open (the device would not resend a message)."""
    sink = ControlledSink(auto=False)
    h = Harness(sink=sink, sink_timeout=5.0)
    proto, transport = h.login()
    proto.dataReceived(wrap(encode_message(CODEC_12, b"weight=1kg\r\n", MESSAGE_TYPE_RESPONSE)))
    h.clock.advance(4.9)
    assert h.sample("teltonika_sink_failures_total", sink="test") == 0
    h.clock.advance(0.2)
    assert h.sample("teltonika_sink_failures_total", sink="test") == 1
    [event] = logged_errors.flush()
    assert event["codec"] == "12" and event["imei"] == IMEI
    assert transport.value() == b""
    assert not transport.disconnecting


def test_max_connections_refuses_excess_at_once() -> None:
    """Beyond max_connections a new connection is aborted at once and counted."""
    h = Harness(max_connections=1)
    _, first = h.connect()
    _, second = h.connect()
    assert not first.disconnecting
    assert second.disconnected  # abortConnection
    assert h.sample("teltonika_connections_refused_total", reason="max_connections") == 1
    assert h.sample("teltonika_connections_open") == 1


@implementer(ISessionListener)
class RecordingListener:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []

    def device_logged_in(self, imei: str, session: object) -> None:
        self.events.append(("in", imei, session))

    def device_logged_out(self, imei: str, session: object) -> None:
        self.events.append(("out", imei, session))


def test_second_login_replaces_older_and_notifies() -> None:
    """The newer login of an IMEI wins: the older connection closes, listeners hear
    out(old), in(new); the old connection's close does not log the new one out."""
    h = Harness()
    listener = RecordingListener()
    h.factory.session_listeners.append(listener)
    old, old_transport = h.login()
    new, _ = h.login()
    assert old_transport.disconnecting
    assert h.factory.sessions[IMEI] is new.session
    old.connectionLost()
    assert h.factory.sessions[IMEI] is new.session
    assert listener.events == [
        ("in", IMEI, old.session),
        ("out", IMEI, old.session),
        ("in", IMEI, new.session),
    ]
    new.connectionLost()
    assert listener.events[-1] == ("out", IMEI, new.session)
    assert h.sample("teltonika_logins_total", result="replaced") == 1


def test_failing_listener_does_not_break_login(logged_errors: Any) -> None:
    """A listener that raises is logged; the login still succeeds."""

    class Broken(RecordingListener):
        def device_logged_in(self, imei: str, session: object) -> None:
            raise RuntimeError("boom")

    h = Harness()
    h.factory.session_listeners.append(Broken())
    proto, _transport = h.login()
    assert h.factory.sessions[IMEI] is proto.session
    assert len(logged_errors.flush()) == 1


def test_bytes_counted_both_ways() -> None:
    """bytes in/out count every byte read and every byte written by write_to_device."""
    h = Harness()
    proto, _transport = h.connect()
    proto.dataReceived(LOGIN)
    proto.session.write_to_device(b"xyz")
    assert h.sample("teltonika_bytes_received_total", transport="tcp") == len(LOGIN)
    assert h.sample("teltonika_bytes_sent_total", transport="tcp") == 4


def test_drain_lets_in_flight_frames_finish_then_close_all() -> None:
    """Shutdown: drain stops reading and waits for the in-flight frame's ACK;
    close_all then closes the connection, aborting it after the bound."""
    sink = ControlledSink(auto=False)
    h = Harness(sink=sink)
    proto, transport = h.login()
    proto.dataReceived(avl_frame(1))
    h.factory.stop_accepting()
    drained = h.factory.drain(10.0)
    assert transport.producerState == "paused"
    assert drained.called == False  # noqa: E712 (`not` would narrow it for mypy past the next call)
    sink.calls[0][4].callback(None)
    assert drained.called
    assert transport.value() == tcp_ack(1)
    assert transport.producerState == "paused"  # finishing a frame does not resume reading
    closed = h.factory.close_all(5.0)
    assert transport.disconnecting and closed.called == False  # noqa: E712 (`not` would narrow it for mypy past the next call)
    h.clock.advance(5.0)
    assert closed.called and transport.disconnected
    _, late = h.connect()
    assert late.disconnected
    assert h.sample("teltonika_connections_refused_total", reason="shutdown") == 1


def test_drain_is_bounded() -> None:
    """A sink that never answers cannot hold the shutdown past the bound."""
    sink = ControlledSink(auto=False)
    h = Harness(sink=sink, sink_timeout=100.0)
    proto, transport = h.login()
    proto.dataReceived(avl_frame(1))
    drained = h.factory.drain(3.0)
    h.clock.advance(3.0)
    assert drained.called
    assert transport.value() == b""


def test_data_frame_header_before_login_refused_at_once() -> None:
    """Before any IMEI packet, the header of a data frame (eight bytes announcing a large
    body) is enough to close: the body is never awaited or held."""
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(b"\x00\x00\x00\x00" + (60_000).to_bytes(4, "big"))
    assert transport.disconnecting
    assert transport.value() == b""
    assert proto._framer.buffered == 0
    assert h.sample("teltonika_decode_errors_total", reason="before_login") == 1


def test_close_aborts_a_peer_that_does_not_read_after_the_grace() -> None:
    """close() waits for the write buffer to drain; a peer that never reads cannot keep the
    socket: after close_grace the connection is aborted and counted."""
    h = Harness(close_grace=3.0)
    proto, transport = h.login()
    proto.session.close()
    assert transport.disconnecting and transport.disconnected == False  # noqa: E712 (`not` would narrow it for mypy past the next call)
    h.clock.advance(2.9)
    assert transport.disconnected == False  # noqa: E712 (`not` would narrow it for mypy past the next call)
    h.clock.advance(0.2)
    assert transport.disconnected  # StringTransport: abortConnection() was called
    assert h.sample("teltonika_timeouts_total", kind="close") == 1


def test_close_that_finishes_leaves_no_abort_timer() -> None:
    """A close that completes in time cancels the abort: nothing is counted."""
    h = Harness(close_grace=3.0)
    proto, _transport = h.login()
    proto.session.close()
    proto.connectionLost()
    assert h.clock.getDelayedCalls() == []
    assert h.sample("teltonika_timeouts_total", kind="close") == 0


@implementer(IStreamServerEndpoint)
class _ListeningEndpoint:
    """Keeps the factory it is asked to listen with (the PROXY-protocol wrapping one)."""

    def __init__(self) -> None:
        self.factory: Any = None

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        self.factory = factory
        return succeed(MemoryReactor().listenTCP(0, factory))


PROXY_V1 = b"PROXY TCP4 203.0.113.7 10.0.0.2 56324 5027\r\n"
PROXY_V2 = (
    b"\r\n\r\n\x00\r\nQUIT\n"  # signature
    + b"\x21\x11"  # v2, PROXY; TCP over IPv4
    + (12).to_bytes(2, "big")
    + bytes([203, 0, 113, 7])
    + bytes([10, 0, 0, 2])
    + (56324).to_bytes(2, "big")
    + (5027).to_bytes(2, "big")
)


@pytest.mark.parametrize("header", [PROXY_V1, PROXY_V2], ids=["v1", "v2"])
def test_peer_is_the_device_behind_a_proxy_protocol_balancer(header: bytes) -> None:
    """Behind ``haproxy:tcp:...`` the login event names the device's address from the
    PROXY header (v1 text or v2 binary), not the balancer's."""
    h = Harness()
    endpoint = _ListeningEndpoint()
    proxyEndpoint(endpoint).listen(h.factory)  # the wrapping haproxy:tcp:... does
    assert endpoint.factory is not None
    wrapper = endpoint.factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 40000))
    wrapper.makeConnection(transport)
    with capturedLogs() as events:
        wrapper.dataReceived(header + LOGIN)
    assert transport.value() == b"\x01"
    [login] = [e for e in events if e.get("event") == "login"]
    assert login["peer"] == "203.0.113.7:56324"


def test_login_timeout_behind_a_proxy_protocol_balancer_names_the_device() -> None:
    """A connection that sends the PROXY header and then nothing: the login timeout's
    event names the device's address, not the balancer's (the address is asked of the
    transport at each event, not taken once at the first read)."""
    h = Harness()
    endpoint = _ListeningEndpoint()
    proxyEndpoint(endpoint).listen(h.factory)
    wrapper = endpoint.factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 40000))
    wrapper.makeConnection(transport)
    wrapper.dataReceived(PROXY_V1)  # the header alone
    with capturedLogs() as events:
        h.clock.advance(h.factory.settings.login_timeout)
    [timeout] = [e for e in events if "No login" in e["log_format"]]
    assert timeout["peer"] == "203.0.113.7:56324"
