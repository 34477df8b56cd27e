"""Publish, then ACK: the server's central promise, written once for TCP and UDP.

A device deletes records from its memory when it gets their acknowledgement, so an ACK
may only follow a *successful* store (docs/design.rst, 'Publish, then ACK'; the replies
in docs/protocol.rst, sections 'AVL data frame' and 'UDP ACK'): the sink's Deferred
fired, within ``--sink-timeout``. A failure or a timeout sends nothing; the device keeps
the records and sends them again.

:class:`Publisher` holds that rule and the metrics that go with it (frames and records
received, sink latency and failures, ACKs and ACKed records), and stores the device
messages (codec 12/13/14, never ACKed) under the same sink timeout and failure count.
What differs between the transports is only how an ACK is sent and what a failure does: a
TCP session writes to its socket and closes on a failure; the UDP listener answers the
datagram's source address and drops the datagram. Each passes those two steps in.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from teltonika.interfaces import ISink
from teltonika.metrics import ServerMetrics
from teltonika.wire.records import AVLRecord

SendAck = Callable[[bytes], bool]
"""Sends an ACK; True when it went out (then it is counted), False when it could not."""
StoreFailed = Callable[[Failure, int], None]
"""Told why the sink did not store a packet of *n* records (already counted as a sink
failure)."""
MessageFailed = Callable[[Failure], None]
"""Told why the sink did not store a device message (already counted as a sink failure)."""


class Publisher:
    """Hands the records of one packet to the sink and sends its ACK only once they are stored.

    :param sink: where records go.
    :param metrics: the server's metrics.
    :param clock: times the sink and bounds it.
    :param timeout: seconds the sink may take before the packet counts as not stored.
    :param transport: ``tcp`` or ``udp``, the label of the ACKs counted here.
    """

    def __init__(
        self,
        sink: ISink,
        metrics: ServerMetrics,
        clock: IReactorTime,
        timeout: float,
        transport: str,
    ) -> None:
        self.sink = sink
        self.metrics = metrics
        self.clock = clock
        self.timeout = timeout
        self.transport = transport
        # The labelled children every packet touches, looked up once: ``labels()`` takes
        # a lock and hashes its arguments on each call (about 5 % of a frame's CPU).
        self._sink_latency = metrics.sink_latency.labels(sink.name)
        self._acks = metrics.acks.labels(transport)
        self._sink_failures = metrics.sink_failures.labels(sink.name)
        self._codec_counters: dict[str, tuple[Counter, Counter]] = {}

    def _counters(self, codec_name: str) -> tuple[Counter, Counter]:
        """The frames and records counters of *codec_name* (labelled children, cached;
        codec names come from the registry, so the cache is as small as it is)."""
        counters = self._codec_counters.get(codec_name)
        if counters is None:
            metrics = self.metrics
            counters = (metrics.frames.labels(codec_name), metrics.records.labels(codec_name))
            self._codec_counters[codec_name] = counters
        return counters

    def publish(
        self,
        imei: str,
        codec_name: str,
        records: tuple[AVLRecord, ...],
        received_at: float,
        ack: bytes | None,
        send_ack: SendAck,
        failed: StoreFailed,
    ) -> Deferred[None]:
        """Store *records*; then, and only then, ``send_ack(ack)``.

        :param received_at: clock time the packet was received (its ``received_at_ms``).
        :param ack: the bytes that acknowledge this packet, or None to send nothing (a
            codec whose packets are never acknowledged).
        :param send_ack: called at most once, after the sink confirmed.
        :param failed: called instead when the sink failed or timed out.
        :return: fires (with None) when the packet ended either way.
        """
        count = len(records)
        frames, records_counter = self._counters(codec_name)
        frames.inc()
        records_counter.inc(count)
        d: Deferred[None] = maybeDeferred(
            self.sink.publish, imei, codec_name, records, int(received_at * 1000)
        )
        d.addTimeout(self.timeout, self.clock)
        return d.addCallbacks(
            self._stored,
            self._failed,
            callbackArgs=(ack, send_ack, count, received_at),
            errbackArgs=(failed, count),
        )

    def _stored(
        self, _: object, ack: bytes | None, send_ack: SendAck, count: int, received_at: float
    ) -> None:
        self._sink_latency.observe(self.clock.seconds() - received_at)
        if ack is None or not send_ack(ack):
            return
        self._acks.inc()
        self.metrics.acked_records.inc(count)

    def _failed(self, failure: Failure, failed: StoreFailed, count: int) -> None:
        self._sink_failures.inc()
        failed(failure, count)

    def publish_message(
        self, imei: str, fields: dict[str, str], failed: MessageFailed
    ) -> Deferred[None]:
        """Store one device message (its stream *fields*), within the same timeout as
        records; nothing is ACKed either way.

        :param failed: called when the sink failed or timed out.
        :return: fires (with None) when the message ended either way.
        """
        d: Deferred[None] = maybeDeferred(self.sink.publish_message, imei, fields)
        d.addTimeout(self.timeout, self.clock)
        return d.addErrback(self._message_failed, failed)

    def _message_failed(self, failure: Failure, failed: MessageFailed) -> None:
        self._sink_failures.inc()
        failed(failure)
