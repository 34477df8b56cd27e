"""A Twisted server for Teltonika GPS trackers.

See README.rst for running it and ../docs in the repository for the protocol notes.
"""

__version__ = "0.1.0"
