"""Codec discovery through ``twisted.plugin``: the built-ins, a third-party dropin, and
the loud failure when two plugins claim one codec id.

The dropin tests run ``load_codecs()`` in a subprocess with a temporary directory on
``PYTHONPATH``: that is exactly how a deployment adds a codec (a file in some
``twisted/plugins`` directory on ``sys.path``, no ``__init__.py``), and it keeps the plugin
cache of this process untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from teltonika.codecs import CodecRegistry, DuplicateCodecError, load_codecs
from teltonika.interfaces import ICodec
from teltonika.wire import (
    CODEC_8,
    AVLPacket,
    AVLRecord,
    DecodeError,
    MessagePacket,
    UnknownCodecError,
    encode_avl_frame,
    encode_command_frame,
    tcp_ack,
)
from teltonika.wire.builtin_codecs import AVLCodec, MessageCodec, codec8

REPO = Path(__file__).resolve().parents[1]

DROPIN_07 = '''
"""A third-party codec 0x07: its body is the codec id, a count, raw bytes and the count."""
from twisted.plugin import IPlugin
from zope.interface import implementer

from teltonika.interfaces import ICodec
from teltonika.wire import DeviceMessage, MessagePacket


@implementer(IPlugin, ICodec)
class SevenCodec:
    codec_id = 0x07
    name = "7"
    kind = "message"

    def decode(self, data, start, end):
        payload = bytes(data[start + 2 : end - 1])
        return MessagePacket(0x07, (DeviceMessage(0x07, 0x06, payload),))

    def encode(self, packet):
        return b"\\x07\\x01" + packet.messages[0].payload + b"\\x01"

    def acknowledgement(self, packet):
        return None


seven = SevenCodec()
'''

DROPIN_DUPLICATE_08 = """
from twisted.plugin import IPlugin
from zope.interface import implementer

from teltonika.interfaces import ICodec


@implementer(IPlugin, ICodec)
class Impostor:
    codec_id = 0x08
    name = "8-impostor"
    kind = "avl"

    def decode(self, data, start, end):
        raise NotImplementedError

    def encode(self, packet):
        raise NotImplementedError

    def acknowledgement(self, packet):
        return None


impostor = Impostor()
"""

LIST_CODECS = textwrap.dedent(
    """
    from teltonika.codecs import load_codecs
    from teltonika.wire import wrap
    registry = load_codecs()
    print(" ".join(f"{codec.codec_id:02x}" for codec in registry))
    codec, packet = registry.decode_frame(wrap(b"\\x07\\x01hello\\x01"))
    print(codec.name, packet.messages[0].payload.decode())
    """
)


def run_with_plugins(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run *code* in a fresh interpreter whose ``sys.path`` includes *tmp_path*."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path), str(REPO), *filter(None, [env.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def write_dropin(tmp_path: Path, name: str, source: str) -> None:
    plugins = tmp_path / "twisted" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    (plugins / name).write_text(source, encoding="utf-8")


def test_builtin_codecs_are_discovered() -> None:
    """``load_codecs()`` finds 8, 8E, 16, 12, 13 and 14 through getPlugins, each a
    verified ICodec with the right name and kind."""
    registry = load_codecs()
    found = {codec.codec_id: codec for codec in registry}
    assert {
        codec_id: found[codec_id].name for codec_id in (0x08, 0x8E, 0x10, 0x0C, 0x0D, 0x0E)
    } == {0x08: "8", 0x8E: "8E", 0x10: "16", 0x0C: "12", 0x0D: "13", 0x0E: "14"}
    for codec in registry:
        assert verifyObject(ICodec, codec)
    assert {found[i].kind for i in (0x08, 0x8E, 0x10)} == {"avl"}
    assert {found[i].kind for i in (0x0C, 0x0D, 0x0E)} == {"message"}
    assert [codec.codec_id for codec in registry] == sorted(found)
    assert registry.by_name("8E") is found[0x8E]
    assert 0x8E in registry
    assert 0x0F not in registry


def test_acknowledgement_rules() -> None:
    """AVL codecs acknowledge with the record count; message codecs never do."""
    registry = load_codecs()
    record = AVLRecord(0, 0, 0.0, 0.0, 0, 0, 0, 0, 0)
    codec, packet = registry.decode_frame(encode_avl_frame(CODEC_8, [record] * 3))
    assert isinstance(packet, AVLPacket)
    assert codec.acknowledgement(packet) == tcp_ack(3) == b"\x00\x00\x00\x03"
    for codec_id in (0x0C, 0x0E):
        codec, packet = registry.decode_frame(
            encode_command_frame(codec_id, b"getver", "352093081452251")
        )
        assert isinstance(packet, MessagePacket)
        assert codec.acknowledgement(packet) is None


def test_registry_refuses_two_codecs_for_one_id() -> None:
    """Two providers of one codec id make the registry fail loudly, naming both."""
    with pytest.raises(DuplicateCodecError, match="0x08") as caught:
        CodecRegistry([codec8, AVLCodec(CODEC_8, "other-8")])
    assert "other-8" in str(caught.value)


def test_registry_refuses_a_non_codec() -> None:
    """An object that does not provide ICodec is refused by verifyObject."""
    with pytest.raises(Invalid):
        CodecRegistry([object()])  # type: ignore[list-item]


def test_registry_with_chosen_codecs() -> None:
    """A registry holds exactly the codecs it is given; other ids are unknown codecs."""
    registry = CodecRegistry([MessageCodec(0x0C, "12")])
    assert len(registry) == 1
    with pytest.raises(UnknownCodecError):
        registry.decode_frame(encode_avl_frame(CODEC_8, [AVLRecord(0, 0, 0.0, 0.0, 0, 0, 0, 0, 0)]))
    with pytest.raises(DecodeError):
        registry.decode_body(b"", 0, 0)


def test_third_party_dropin_adds_a_codec(tmp_path: Path) -> None:
    """A dropin file in another directory on the plugin path adds codec 0x07 without
    touching this package, and the registry decodes its frames."""
    write_dropin(tmp_path, "teltonika_test_dropin.py", DROPIN_07)
    assert not (tmp_path / "twisted" / "__init__.py").exists()
    result = run_with_plugins(tmp_path, LIST_CODECS)
    assert result.returncode == 0, result.stderr
    ids, decoded = result.stdout.splitlines()
    assert ids.split() == ["07", "08", "0c", "0d", "0e", "10", "8e"]
    assert decoded == "7 hello"


def test_dropin_claiming_a_builtin_id_fails_loudly(tmp_path: Path) -> None:
    """A second plugin for codec 0x08 makes load_codecs() raise DuplicateCodecError."""
    write_dropin(tmp_path, "teltonika_test_dropin.py", DROPIN_07)
    write_dropin(tmp_path, "teltonika_test_impostor.py", DROPIN_DUPLICATE_08)
    result = run_with_plugins(tmp_path, "from teltonika.codecs import load_codecs; load_codecs()")
    assert result.returncode != 0
    assert "DuplicateCodecError" in result.stderr
    assert "0x08" in result.stderr


def test_codec_plugin_module_imports_no_reactor(tmp_path: Path) -> None:
    """Importing the plugin module (what every plugin scan does) installs no reactor and
    pulls in neither Redis nor metrics."""
    code = textwrap.dedent(
        """
        import sys
        import twisted.plugins.teltonika_codecs
        import teltonika.codecs, teltonika.wire
        bad = [m for m in ("twisted.internet.reactor", "txredisapi", "prometheus_client")
               if m in sys.modules]
        print("loaded:", bad)
        """
    )
    result = run_with_plugins(tmp_path, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded: []"
