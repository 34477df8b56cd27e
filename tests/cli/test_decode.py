"""``teltonika decode``: one JSON object per frame on stdout, one line per bad frame on
stderr, exit status 1 when any frame was bad."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from teltonika.cli import main
from tests.servers import checkout_env
from tests.wire.vectors import BY_NAME

REPO = Path(__file__).resolve().parents[2]

ISSUE_FRAME = (
    "000000000000002808010000016b40d9ad80010000000000000000000000000000000103021503010101425e"
    "100000010000f22a"
)
ISSUE_RECORD = {
    "timestamp_ms": 1560161136000,
    "priority": 1,
    "longitude": 0.0,
    "latitude": 0.0,
    "altitude": 0,
    "angle": 0,
    "satellites": 0,
    "speed": 0,
    "event_io_id": 1,
    "io": {"21": 3, "1": 1, "66": 24080},
}


def vector_hex(name: str) -> str:
    hex_text: str = BY_NAME[name]["hex"]
    return hex_text


def decode(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[Any], str]:
    """Run ``teltonika decode ARGS`` in-process: (status, parsed stdout lines, stderr)."""
    status = main(["decode", *args])
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines()], err


def test_issue_example_frame(capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's example frame prints its one record, keys in the documented order."""
    status, lines, err = decode(capsys, ISSUE_FRAME)
    assert (status, err) == (0, "")
    assert lines == [{"codec": "8", "records": [ISSUE_RECORD]}]
    assert list(lines[0]) == ["codec", "records"]
    assert list(lines[0]["records"][0]) == list(ISSUE_RECORD)


def test_spaces_and_0x_are_tolerated(capsys: pytest.CaptureFixture[str]) -> None:
    """Hex with spaces, colons and 0x prefixes decodes like the plain form."""
    spaced = "0x" + " ".join(ISSUE_FRAME[i : i + 2] for i in range(0, len(ISSUE_FRAME), 2))
    status, lines, _ = decode(capsys, spaced.upper().replace("0X", "0x"))
    assert status == 0
    assert lines[0]["records"] == [ISSUE_RECORD]
    status, lines, _ = decode(capsys, ":".join(f"0x{b:02x}" for b in bytes.fromhex(ISSUE_FRAME)))
    assert status == 0
    assert lines[0]["records"] == [ISSUE_RECORD]


def test_imei_frame(capsys: pytest.CaptureFixture[str]) -> None:
    """A login packet prints the IMEI."""
    assert decode(capsys, vector_hex("imei_login_wiki")) == (0, [{"imei": "356307042441013"}], "")


def test_codec16_generation_type(capsys: pytest.CaptureFixture[str]) -> None:
    """Codec 16 records carry their generation type."""
    status, lines, _ = decode(capsys, vector_hex("c16_wiki_example"))
    assert status == 0
    assert lines[0]["codec"] == "16"
    assert [r["generation_type"] for r in lines[0]["records"]] == [5, 5]
    assert lines[0]["records"][0]["io"] == {"1": 0, "3": 0, "11": 39, "66": 22074}


def test_nx_values_as_hex(capsys: pytest.CaptureFixture[str]) -> None:
    """An 8E NX value prints as a hex string; fixed-width values stay numbers."""
    status, lines, _ = decode(capsys, vector_hex("c8e_fm64_doc_vin_nx"))
    assert status == 0
    record = lines[0]["records"][0]
    assert lines[0]["codec"] == "8E"
    assert record["io"]["256"] == "00" * 17
    assert record["io"]["16"] == 0xCBDF
    assert record["longitude"] == 25.2562916


def test_codec12_response_with_text(capsys: pytest.CaptureFixture[str]) -> None:
    """A codec 12 response prints type, payload hex and the printable text."""
    status, lines, _ = decode(capsys, vector_hex("c12_wiki_getinfo_response"))
    text = BY_NAME["c12_wiki_getinfo_response"]["expected"]["messages"][0]["payload_ascii"]
    assert status == 0
    assert lines == [{"codec": "12", "type": 6, "payload_hex": text.encode().hex(), "text": text}]


def test_codec12_binary_payload_has_no_text(capsys: pytest.CaptureFixture[str]) -> None:
    """A binary payload prints as hex only."""
    status, lines, _ = decode(capsys, vector_hex("c12_traccar_unsolicited_serial_binary"))
    assert status == 0
    assert lines == [{"codec": "12", "type": 6, "payload_hex": "010300010015d5c5"}]


def test_codec14_with_imei(capsys: pytest.CaptureFixture[str]) -> None:
    """A codec 14 frame adds the IMEI it carries."""
    status, lines, _ = decode(capsys, vector_hex("c14_wiki_getver_request"))
    assert status == 0
    assert lines == [
        {
            "codec": "14",
            "type": 5,
            "payload_hex": b"getver".hex(),
            "text": "getver",
            "imei": "352093081452251",
        }
    ]


def test_codec13_with_timestamp(capsys: pytest.CaptureFixture[str]) -> None:
    """A codec 13 frame adds its timestamp in milliseconds."""
    status, lines, _ = decode(capsys, vector_hex("c13_traccar_real_gtsl"))
    assert status == 0
    assert lines[0]["codec"] == "13"
    assert lines[0]["timestamp_ms"] == 1680554705000
    assert lines[0]["text"] == "GTSL|6|1|0|12749884|1|\r\n"


def test_named_adds_catalogue_view(capsys: pytest.CaptureFixture[str]) -> None:
    """``--named`` adds names, units and scaled values; the raw io stays as it was."""
    status, lines, _ = decode(capsys, "--named", ISSUE_FRAME)
    assert status == 0
    record = lines[0]["records"][0]
    assert record["io"] == ISSUE_RECORD["io"]
    assert record["named"]["66"] == {
        "name": "external_voltage",
        "unit": "V",
        "value": 24.08,
        "raw": 24080,
    }
    assert record["named"]["21"]["name"] == "gsm_signal"
    assert record["named"]["1"]["name"] == "digital_input_1"


def test_named_with_catalogue_file_and_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``--catalogue`` layers a file over the built-in catalogue; ``--model`` picks its
    per-model entries."""
    extra = tmp_path / "extra.json"
    extra.write_text(
        json.dumps(
            {
                "elements": {"21": {"name": "signal_bars", "unit": "bars"}},
                "models": {"FMB640": {"elements": {"66": {"name": "supply", "scale": 0.01}}}},
            }
        ),
        encoding="utf-8",
    )
    status, lines, _ = decode(capsys, "--named", "--catalogue", str(extra), ISSUE_FRAME)
    named = lines[0]["records"][0]["named"]
    assert status == 0
    assert named["21"]["name"] == "signal_bars"
    assert named["66"]["name"] == "external_voltage"
    status, lines, _ = decode(
        capsys, "--named", "--catalogue", str(extra), "--model", "FMB640", ISSUE_FRAME
    )
    assert lines[0]["records"][0]["named"]["66"]["name"] == "supply"
    assert lines[0]["records"][0]["named"]["66"]["value"] == 240.8


def test_invalid_frame_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """A frame with a bad CRC prints nothing on stdout, one line on stderr naming the
    error and its offset, and exits 1."""
    status, lines, err = decode(capsys, vector_hex("c16_wiki_2018_example_bad_crc"))
    assert status == 1
    assert lines == []
    assert len(err.splitlines()) == 1
    assert "CRCError" in err
    assert "offset" in err


def test_not_hex_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """Text that is not hex is reported, not a traceback."""
    status, lines, err = decode(capsys, "hello")
    assert (status, lines) == (1, [])
    assert err.startswith("not hex")


def test_batch_from_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    """``-`` decodes one frame per line; bad lines get one stderr line each (with their
    line number) and exit 1; the good frames are all decoded, in order."""
    batch = "\n".join(
        [
            ISSUE_FRAME,
            vector_hex("c14_wiki_nack_response_as_published"),  # bad CRC
            "",
            "0x" + vector_hex("imei_login_wiki"),
            "zz not hex",
            vector_hex("c15_wiki_hello"),  # unknown codec
            vector_hex("c13_traccar_real_gtsl"),
        ]
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(batch + "\n"))
    status, lines, err = decode(capsys, "-")
    assert status == 1
    assert lines[0] == {"codec": "8", "records": [ISSUE_RECORD]}
    assert lines[1] == {"imei": "356307042441013"}
    assert lines[2]["codec"] == "13"
    assert len(lines) == 3
    errors = err.splitlines()
    assert len(errors) == 3
    assert errors[0].startswith("frame 2: invalid frame: CRCError")
    assert errors[1].startswith("frame 5: not hex")
    assert errors[2].startswith("frame 6: invalid frame: UnknownCodecError")


def test_batch_all_good_exits_0(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    """A batch without bad frames exits 0."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(ISSUE_FRAME + "\n" + ISSUE_FRAME + "\n"))
    status, lines, err = decode(capsys, "-")
    assert (status, len(lines), err) == (0, 2, "")


def test_imei_length_mismatch(capsys: pytest.CaptureFixture[str]) -> None:
    """A login packet whose length prefix lies is an invalid frame."""
    status, _, err = decode(capsys, "000f3335363330")
    assert status == 1
    assert "IMEI packet declares 15 bytes" in err


def test_python_m_entry_point() -> None:
    """``python -m teltonika decode`` runs the same command in a fresh interpreter."""
    env = checkout_env()
    result = subprocess.run(
        [sys.executable, "-m", "teltonika", "decode", ISSUE_FRAME],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"codec": "8", "records": [ISSUE_RECORD]}
