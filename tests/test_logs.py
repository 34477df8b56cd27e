"""The JSON log observer for ``twistd --logger=teltonika.logs.json_observer``."""

from __future__ import annotations

import io
import json

import pytest
from twisted.logger import Logger

from teltonika.logs import json_observer


def test_one_json_object_per_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each event becomes one JSON line carrying the format and the keyword data."""
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    log = Logger(namespace="teltonika.test", observer=json_observer())
    log.info("Device {imei} logged in", imei="356307042441013", event="login")
    log.warn("Rejected frame, reason {reason}", reason="crc")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["log_format"] == "Device {imei} logged in"
    assert first["imei"] == "356307042441013" and first["event"] == "login"
    assert json.loads(lines[1])["reason"] == "crc"
