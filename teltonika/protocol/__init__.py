"""The TCP side of the server, and the rule both transports share.

* :mod:`teltonika.protocol.tcp`: the device Protocol (an adapter), its Factory (what
  every session shares, and the registry of live sessions) and their settings.
* :mod:`teltonika.protocol.session`: one tracker's session, its lifecycle and its
  decisions (login, frame order, flow control, timers, close).
* :mod:`teltonika.protocol.publish`: publish, then ACK; the TCP session and the UDP
  listener (:mod:`teltonika.protocol.udp`) both use it.
"""
