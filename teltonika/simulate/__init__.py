"""``teltonika simulate``: a fleet of simulated FMB-series trackers.

The pieces, one job each:

* :mod:`teltonika.simulate.track` -- a plausible position track and IO values per device;
* :mod:`teltonika.simulate.answers` -- what a device replies to codec 12 / 14 commands;
* :mod:`teltonika.simulate.device` -- the TCP device state machine (login, buffered records,
  ACK checking, resend with backoff, keepalives, commands) behind a thin Protocol;
* :mod:`teltonika.simulate.udp` -- the same device over the UDP channel;
* :mod:`teltonika.simulate.ledger` -- counters, ACK latencies and the ACKed-record ledger;
* :mod:`teltonika.simulate.verify` -- the ledger checked against the Redis stream or JSONL file;
* :mod:`teltonika.simulate.fleet` -- many devices in one reactor, several processes for more.

Its command line is ``teltonika simulate`` (:mod:`teltonika.cli.simulate`).

Only the wire layer (:mod:`teltonika.wire`) is shared with the server: the simulator must
be able to catch the server breaking the protocol, so it reuses no server logic.
"""
