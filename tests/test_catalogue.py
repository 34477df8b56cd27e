"""The IO catalogue: built-in entries, deployment overrides, per-model entries, and the
signed/scaled interpretation of raw values (which are never replaced)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teltonika.catalogue import ENVIRONMENT_VARIABLE, Catalogue, IODefinition
from teltonika.wire import NX

REQUIRED = {
    1, 2, 3, 4, 9, 10, 16, 21, 24, 66, 67, 68, 69, 72, 73, 74, 75, 78, 80,
    181, 182, 199, 200, 239, 240, 241, 253,
}  # fmt: skip


@pytest.fixture(autouse=True)
def _no_environment_catalogue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)


def write(path: Path, document: dict[str, Any]) -> str:
    path.write_text(json.dumps(document), encoding="utf-8")
    return str(path)


def test_builtin_catalogue_covers_the_issue_list() -> None:
    """Every IO id the issue lists has a built-in entry; Dallas temperatures are signed
    and scaled to degrees, voltages to volts."""
    catalogue = Catalogue.load()
    missing = {io_id for io_id in REQUIRED if catalogue.get(io_id) is None}
    assert missing == set()
    for io_id in (72, 73, 74, 75):
        definition = catalogue.get(io_id)
        assert definition is not None
        assert definition.signed
        assert definition.scale == 0.1
    assert catalogue.get(66) == IODefinition("external_voltage", "V", 0.001, False)
    assert catalogue.get(239) == IODefinition("ignition", None, 1, False)


@pytest.mark.parametrize(
    ("width", "raw", "expected"),
    [
        (4, 0xFFFFFF9C, -10.0),  # -100 x 0.1
        (4, 0x000000FA, 25.0),
        (4, 0x7FFFFFFF, 214748364.7),
        (4, 0x80000000, -214748364.8),
        (2, 0xFFFF, -0.1),
        (2, 0x8000, -3276.8),
        (1, 0x80, -12.8),
        (8, 2**64 - 1, -0.1),
    ],
)
def test_signed_twos_complement_then_scale(width: int, raw: int, expected: float) -> None:
    """A signed element is read as two's complement of its *sent* width, then scaled."""
    assert IODefinition("t", "°C", 0.1, True).interpret(width, raw) == expected


def test_unsigned_and_unscaled_values_stay_integers() -> None:
    """Unsigned values are never sign-flipped; scale 1 keeps the exact integer."""
    assert IODefinition("odometer", "m").interpret(4, 0xFFFFFFFF) == 0xFFFFFFFF
    assert IODefinition("big", None).interpret(8, 2**64 - 1) == 2**64 - 1
    assert isinstance(IODefinition("n").interpret(2, 7), int)


def test_nx_values_are_hex() -> None:
    """NX (bytes) values come back as hex: their meaning is element-specific."""
    assert IODefinition("vin").interpret(NX, b"\x01\xab") == "01ab"


@given(
    width=st.sampled_from([1, 2, 4, 8]),
    data=st.data(),
    scale=st.sampled_from([1, 0.1, 0.01, 0.001]),
)
def test_signed_interpretation_inverts_twos_complement(
    width: int, data: st.DataObject, scale: float
) -> None:
    """For every signed value of every width, the unsigned wire form interprets back to
    the value times the scale."""
    bits = 8 * width
    value = data.draw(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    raw = value % (1 << bits)
    got = IODefinition("x", None, scale, True).interpret(width, raw)
    if scale == 1:
        assert got == value
    else:
        # the float nearest the exact decimal product, e.g. -12.8 for -128 x 0.1
        assert got == float(Decimal(value) * Decimal(str(scale)))


def test_override_file_adds_and_replaces_entries(tmp_path: Path) -> None:
    """A deployment file adds new ids and replaces built-in ones entry by entry; the
    built-ins it does not mention stay."""
    extra = write(
        tmp_path / "fleet.json",
        {
            "elements": {
                "10800": {"name": "eye_temperature_1", "unit": "°C", "scale": 0.01, "signed": True},
                "66": {"name": "supply_voltage", "unit": "mV"},
            }
        },
    )
    catalogue = Catalogue.load([extra])
    assert catalogue.get(10800) == IODefinition("eye_temperature_1", "°C", 0.01, True)
    assert catalogue.get(66) == IODefinition("supply_voltage", "mV", 1, False)
    assert catalogue.get(67) == IODefinition("battery_voltage", "V", 0.001, False)


def test_later_files_win(tmp_path: Path) -> None:
    """With several files the later one wins for the ids both define."""
    first = write(tmp_path / "a.json", {"elements": {"9": {"name": "first"}, "10": {"name": "a"}}})
    second = write(tmp_path / "b.json", {"elements": {"9": {"name": "second"}}})
    catalogue = Catalogue.load([first, second])
    assert catalogue.get(9) == IODefinition("second")
    assert catalogue.get(10) == IODefinition("a")


def test_per_model_entries(tmp_path: Path) -> None:
    """A model's entries win for that model only; other models see the general entry."""
    extra = write(
        tmp_path / "models.json",
        {
            "models": {
                "FMB640": {"elements": {"9": {"name": "fuel_level", "unit": "l", "scale": 0.1}}}
            }
        },
    )
    catalogue = Catalogue.load([extra])
    assert catalogue.get(9, "FMB640") == IODefinition("fuel_level", "l", 0.1, False)
    assert (
        catalogue.get(9, "FMB920")
        == catalogue.get(9)
        == IODefinition("analog_input_1", "V", 0.001, False)
    )
    assert catalogue.get(66, "FMB640") == catalogue.get(66)
    named = catalogue.named(((9, 2, 123), (66, 2, 12000)), model="FMB640")
    assert named["9"] == {"name": "fuel_level", "unit": "l", "value": 12.3, "raw": 123}
    assert named["66"]["value"] == 12.0


def test_environment_variable_lists_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TELTONIKA_IO_CATALOGUE names files (os.pathsep-separated) loaded before the
    explicit ones; ``use_environment=False`` ignores it."""
    import os

    a = write(tmp_path / "a.json", {"elements": {"500": {"name": "from_env_a"}}})
    b = write(
        tmp_path / "b.json", {"elements": {"501": {"name": "from_env_b"}, "9": {"name": "env"}}}
    )
    explicit = write(tmp_path / "c.json", {"elements": {"9": {"name": "explicit"}}})
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, os.pathsep.join([a, b]))
    catalogue = Catalogue.load([explicit])
    assert catalogue.get(500) == IODefinition("from_env_a")
    assert catalogue.get(501) == IODefinition("from_env_b")
    assert catalogue.get(9) == IODefinition("explicit")
    assert Catalogue.load(use_environment=False).get(500) is None


def test_bad_entry_names_the_file(tmp_path: Path) -> None:
    """An entry without a name (or with a non-numeric scale) is refused, naming its file."""
    bad = write(tmp_path / "bad.json", {"elements": {"9": {"unit": "V"}}})
    with pytest.raises(ValueError, match=r"bad\.json"):
        Catalogue.load([bad])
    worse = write(tmp_path / "worse.json", {"elements": {"9": {"name": "x", "scale": "big"}}})
    with pytest.raises(ValueError, match=r"worse\.json"):
        Catalogue.load([worse])


def test_named_view_keeps_raw_values() -> None:
    """The named view adds name/unit/value next to the raw value; unknown ids keep the raw
    value with no name; NX raw values are hex."""
    catalogue = Catalogue.load()
    named = catalogue.named(((72, 4, 0xFFFFFF9C), (65000, 1, 5), (256, NX, b"\x00\x01")))
    assert named["72"] == {
        "name": "dallas_temperature_1",
        "unit": "°C",
        "value": -10.0,
        "raw": 0xFFFFFF9C,
    }
    assert named["65000"] == {"name": None, "unit": None, "value": 5, "raw": 5}
    assert named["256"] == {"name": "vin", "unit": None, "value": "0001", "raw": "0001"}
