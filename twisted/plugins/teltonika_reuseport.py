"""The ``reuseport:`` server endpoint string (``SO_REUSEPORT``, several processes on one
port): ``--port reuseport:5027``, ``--port haproxy:reuseport:5027``.

Imports only :mod:`teltonika.reuseport` (sockets and Twisted interfaces, no reactor):
every plugin scan imports this file.
"""

from teltonika.reuseport import parser as teltonikaReusePort  # noqa: N812 (plugin name)

__all__ = ["teltonikaReusePort"]
