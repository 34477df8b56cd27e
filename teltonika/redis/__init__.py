"""Redis adapters over txredisapi, shared by the server, the commands and the processor.

* ``connect``: a Redis URL (one server or through Sentinel) into a reconnecting
  connection; ``sentinel``: the master followed across failovers.
* ``connection``: ``RedisConnection``, the typed view of a connection every part takes.
* ``groups``: stream consumer groups (create, read, what an error reply means).
* ``streams``: pipelined ``XADD``; ``durability``: whether Redis keeps what it was given.
"""
