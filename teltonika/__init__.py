"""A Twisted server for Teltonika GPS trackers, and the processor that stores what it receives.

README.rst says how to run it, and its "Architecture" section follows one frame from the
socket to its ACK and to its row. In ``docs/``: ``protocol.rst`` (the wire protocol as
this server speaks it), ``design.rst`` (the invariants and the decisions) and
``operations.rst`` (the runbook). The code, one job per package or module:

The ingestion server, ``twistd teltonika``:

* ``wire/``: the pure wire layer, bytes in and immutable records out (and back): the
  framer that cuts a TCP stream, the frame envelope and its CRC, the AVL codecs 8/8E/16,
  the message codecs 12/13/14, the login packet, the UDP datagram, and the built-in codecs
  as ``ICodec`` plugins (``builtin_codecs``). No reactor, no I/O.
* ``codecs``: the codec registry (``ICodec`` plugins by codec id); ``interfaces``: the
  seams (``ICodec``, ``ISink`` and ``IManagedSink``, the sink the ingestion service
  starts and closes, ``IDeviceAuthority``, ``ISessionListener``, ``IDeviceSocket``).
* ``protocol/``: the device transports and what they share. ``tcp``: a thin Protocol
  and its Factory in front of the session that decides (``session``: login, frames in
  order, flow control, timers, close); ``udp``: datagrams (``--udp-port``), decoded by the
  same codec registry; ``publish``: the publish-then-ACK rule both transports follow;
  ``queue``: the per-socket write queue (every byte to a device, one outstanding
  command); ``settings``: the server's limits and their defaults. It imports nothing from
  ``commands/``.
* ``authority``: who may log in (``--devices``). ``reuseport``: the ``reuseport:``
  endpoint, several processes on one device port (``SO_REUSEPORT``).
* ``contract``: the record contract, what one stream entry or JSON line holds (version 1).
* ``sinks/``: where records go before the ACK: a Redis stream or a fsynced JSON-lines
  file, both with group commit. ``redis/``: Redis connections (made from a URL, typed as
  ``RedisConnection``), consumer groups and their error replies, the durability check
  and pipelined ``XADD``, shared by every Redis user.
* ``commands/``: the command plane: the connection registry and heartbeat, the
  janitor, the command consumer and offline delivery, all through Redis; it hands each
  command to its device's write queue in ``protocol/``.
* ``services/``: the ingestion service (start-up and the ordered shutdown) and the
  operations endpoint (``/metrics``, ``/healthz``, ``/readyz``), and the lock that keeps
  one ``--instance-id`` to one process per host and Redis. ``tap``: the options and
  the service tree twistd runs; ``options``: the option coercers and endpoint checks
  both taps share. ``units``: ``SECONDS``; ``exits``: the one immediate process exit.
  ``metrics``, ``logs``: the server's metrics, JSON log output and rate-limited log
  events.

The processor, ``twistd teltonika-processor`` (``processor/``; the server never imports
it): ``tap`` and ``service`` (options, start-up, shutdown, exit status); ``defaults`` (the
defaults the tap and the settings classes share); ``consumer`` (the
read, write, acknowledge loop); ``streams`` and ``fastreader`` (its Redis commands);
``entries`` and ``identity`` (the contract read back, and a record's hash); ``writer``,
``database`` and ``migrations`` (PostgreSQL on its own thread, the SQL files in
``migrations/``); ``state`` (per-device latest positions); ``trim`` (safe stream trimming);
``live/`` (the WebSocket broadcast and the operator map page).

Tools: ``cli/``, the ``teltonika`` console script, one module per subcommand (``decode``,
``send``, ``simulate``); ``simulate/`` (a simulated tracker fleet and the ledger check that
every ACKed record is stored); ``catalogue`` with ``data/io_catalogue.json``
(names, units and scales of IO elements). The twistd plugin files themselves are in
``twisted/plugins/`` at the top of the repository.
"""

__version__ = "0.1.0"
