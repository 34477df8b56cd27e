"""``teltonika simulate`` end to end: the real console entry point in a child process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from teltonika.cli import main
from teltonika.contract import json_line
from tests.helpers import simulate
from tests.simulate.fakeserver import FakeServerFactory

reactor: Any = _reactor


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--devices", "0"], "--devices must be at least 1"),
        (["--verify"], "exactly one of --redis URL or --output PATH"),
        (["--verify-only", "--output", "x"], "--verify-only needs --ledger PATH"),
        (["--corrupt-rate", "1.5"], "--corrupt-rate"),
        (["--records-per-frame", "300"], "1..255"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_cli_run_prints_json_saves_ledger_and_verifies(tmp_path: Path) -> None:
    """A run prints one JSON summary, saves the ledger; --verify-only checks it later."""
    factory = FakeServerFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    ledger = tmp_path / "ledger.json"
    try:
        code, out, err = await simulate(
            "--port", str(port.getHost().port), "--devices", "6", "--frames", "3",
            "--interval", "0.05", "--records-per-frame", "2", "--codec", "8",
            "--json", "--ledger", str(ledger), "--progress", "0.2",
        )  # fmt: skip
    finally:
        await port.stopListening()
    assert code == 0, err
    summary = orjson.loads(out)
    assert summary["devices"] == 6
    assert summary["records_acked"] == 36
    assert summary["broken_promises"] == 0
    # The fake server keeps records in memory; write them as the file sink would, minus one.
    sink = tmp_path / "records.jsonl"
    assert all(imei is not None for imei, _ in factory.frames)  # every frame after a login
    records = [(imei, r) for imei, packet in factory.frames if imei for r in packet.records]
    sink.write_bytes(b"".join(json_line(i, "8", r, 0, "x") for i, r in records))
    code, out, _ = await simulate(
        "--verify-only", "--ledger", str(ledger), "--output", str(sink), "--json"
    )
    assert code == 0
    assert orjson.loads(out)["verify"]["missing"] == 0
    sink.write_bytes(b"".join(json_line(i, "8", r, 0, "x") for i, r in records[1:]))
    code, out, _ = await simulate("--verify-only", "--ledger", str(ledger), "--output", str(sink))
    assert code == 1
    assert "MISSING 1" in out


@pytest_twisted.ensureDeferred
async def test_cli_exits_1_when_the_server_breaks_a_promise(tmp_path: Path) -> None:
    """A wrong ACK count makes the run exit 1 and names the violation."""
    factory = FakeServerFactory()
    factory.ack_count = lambda n: n + 1
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        code, out, _err = await simulate(
            "--port", str(port.getHost().port), "--devices", "2", "--frames", "1",
            "--interval", "0.05", "--records-per-frame", "2", "--drain", "0.3",
            "--progress", "0", "--processes", "2",
        )  # fmt: skip
    finally:
        await port.stopListening()
    assert code == 1
    assert "ACKed 3 for a frame of 2 records" in out
