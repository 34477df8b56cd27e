"""A Twisted server for Teltonika GPS trackers.

See README.rst for running it, and docs/ in the repository (docs/protocol.rst: the wire
protocol as this server speaks it) for how it works and why.
"""

__version__ = "0.1.0"
