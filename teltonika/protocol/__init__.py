"""The device transports, and what they share.

* :mod:`teltonika.protocol.tcp`: the device Protocol (an adapter) and its Factory (what
  every session shares, and the registry of live sessions).
* :mod:`teltonika.protocol.session`: one tracker's session, its lifecycle and its
  decisions (login, frame order, flow control, timers, close).
* :mod:`teltonika.protocol.udp`: the UDP listener, one datagram at a time.
* :mod:`teltonika.protocol.publish`: publish, then ACK; the TCP session and the UDP
  listener both use it.
* :mod:`teltonika.protocol.queue`: the per-socket write queue, the TCP session's only
  way to its socket (ACKs, and at most one outstanding command).
* :mod:`teltonika.protocol.settings`: the server's limits and their defaults.

The command plane (``commands/``) submits commands to the write queue; this package
imports nothing from it.
"""
