"""Outbound commands (codec 12 / 14): routing through Redis, statuses, offline delivery.

Each command ends in its device's per-socket write queue,
:mod:`teltonika.protocol.queue` (every byte to a device and the one outstanding command:
it is the protocol's write path, so it lives there and this package uses it). Everything
here talks to Redis: ``registry`` (IMEI -> instance, and
the heartbeat), ``janitor`` (cleaning up after dead instances), ``consumer`` (this
instance's command stream into the device's queue, statuses out, offline delivery at
login), with ``scripts`` holding their atomic Lua steps. ``router`` connects device logins
and logouts to them and ``service`` wires them into ``twistd teltonika``. ``messages``
defines the stream entries (the command contract), ``client`` is the sender's side of it
(``teltonika send``), ``codec`` turns a command into bytes and a reply into text, and
``metrics`` counts it all. docs/design.rst explains the rules ('One outstanding command
per socket', 'The write gate', 'One terminal status per command', 'Registry races').
"""
