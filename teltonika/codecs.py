"""The codec registry: ``getPlugins(ICodec)`` turned into a lookup by codec id.

The Factory receives a :class:`CodecRegistry` as a constructor argument, so tests hand it
exactly the codecs they need; :func:`load_codecs` is what ``makeService`` and the CLI call.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from types import ModuleType

from twisted.plugin import getPlugins
from zope.interface.verify import verifyObject

from teltonika.interfaces import ICodec
from teltonika.wire.errors import TruncatedError, UnknownCodecError
from teltonika.wire.frames import BODY_OFFSET, unwrap
from teltonika.wire.records import Packet


class DuplicateCodecError(Exception):
    """Two plugins claim the same codec id: refuse to guess which one is meant."""


class CodecRegistry:
    """An immutable map from codec id to :class:`ICodec` provider."""

    def __init__(self, codecs: Iterable[ICodec]) -> None:
        by_id: dict[int, ICodec] = {}
        for codec in codecs:
            verifyObject(ICodec, codec)
            other = by_id.get(codec.codec_id)
            if other is not None:
                raise DuplicateCodecError(
                    f"codec id 0x{codec.codec_id:02X} is claimed by both {other!r} and {codec!r}"
                )
            by_id[codec.codec_id] = codec
        self._by_id: Mapping[int, ICodec] = by_id

    def __iter__(self) -> Iterator[ICodec]:
        return iter(sorted(self._by_id.values(), key=lambda codec: codec.codec_id))

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, codec_id: object) -> bool:
        return codec_id in self._by_id

    def get(self, codec_id: int) -> ICodec | None:
        """The codec for *codec_id*, or None."""
        return self._by_id.get(codec_id)

    def by_name(self, name: str) -> ICodec:
        """The codec whose short name is *name* ('8E'); KeyError if none."""
        for codec in self._by_id.values():
            if codec.name == name:
                return codec
        raise KeyError(name)

    def decode_body(self, data: bytes, start: int, end: int) -> tuple[ICodec, Packet]:
        """Decode the body ``data[start:end]`` with the codec its first byte names.

        :raise DecodeError: unknown codec or any decoding failure.
        """
        if start >= end:
            raise TruncatedError("empty body", start)
        codec = self._by_id.get(data[start])
        if codec is None:
            raise UnknownCodecError(data[start], start)
        return codec, codec.decode(data, start, end)

    def decode_frame(self, frame: bytes) -> tuple[ICodec, Packet]:
        """Check the envelope and CRC of a whole TCP data frame, then decode its body.

        :raise DecodeError: any failure; nothing else escapes.
        """
        end = unwrap(frame)
        return self.decode_body(frame, BODY_OFFSET, end)


def load_codecs(package: ModuleType | None = None) -> CodecRegistry:
    """Find every :class:`ICodec` plugin and build the registry.

    :param package: the plugin package to scan (default ``twisted.plugins``, which
        covers every ``twisted/plugins`` directory on ``sys.path``).
    :raise DuplicateCodecError: two plugins claim one codec id.
    """
    if package is None:
        return CodecRegistry(getPlugins(ICodec))
    return CodecRegistry(getPlugins(ICodec, package))
