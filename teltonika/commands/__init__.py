"""Outbound commands (codec 12 / 14): the per-socket queue, routing through Redis, offline delivery.

``queue`` is pure Twisted (a writer and a clock); everything that talks to Redis lives in
``registry``, ``janitor``, ``consumer`` and ``offline``; ``messages`` defines the stream
entries (the command contract) and ``codec`` turns a command into bytes and a reply into text.
"""
