"""Teltonika's built-in codecs as ``ICodec`` plugins.

Kept tiny and side-effect free: every Twisted program that scans plugins imports this
file. A third-party codec is a file like this one in any ``twisted/plugins`` directory
on ``sys.path``; see README.rst, "Codecs and adding one".
"""

from teltonika.wire.builtin_codecs import codec8, codec8e, codec12, codec13, codec14, codec16

__all__ = ["codec8", "codec8e", "codec12", "codec13", "codec14", "codec16"]
