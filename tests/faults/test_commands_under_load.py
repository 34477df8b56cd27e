"""Commands to simulated devices while the fleet streams: replies come back through
``teltonika send`` and the ACK stream of every device stays intact.

The devices stream in a closed loop (each sends its next frame as soon as the last one
is ACKed), so they await an ACK all the time but for a few microseconds, and they are
strict like the firmware: a command frame where an ACK is awaited is a broken promise
(``command_in_place_of_ack``). A server that writes a command whenever no other command
is outstanding breaks it at once."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.servers import checkout_env

from .harness import (
    ROOT,
    ServerProcess,
    Simulation,
    assert_nothing_lost,
    fleet_options,
    verify,
    wait_until,
)

pytestmark = pytest.mark.slow
IMEI_START = 356307042440000


def send(redis_url: str, imei: int, *command: str) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-m", "teltonika", "send", "--redis", redis_url, str(imei), *command,
         "--timeout", "10"],
        cwd=str(ROOT), env=checkout_env(), capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    return out.returncode, out.stdout.decode() + out.stderr.decode()


def test_commands_answered_by_simulated_devices_under_load(tmp_path: Path, redis_url: str) -> None:
    """Codec 12 and 14 commands reach the right simulated device mid-stream and its reply
    comes back; no device sees a command where it awaits an ACK, nothing is lost."""
    server = ServerProcess(tmp_path, ["--redis", redis_url]).start()
    try:
        sim = Simulation(tmp_path, server.port, fleet_options(8, duration=30, interval=0))
        wait_until(lambda: server.metric("teltonika_acked_records_total") > 500, 20, "fleet ACKed")
        # Device 3's command alongside device 5's two (in order: setdigout, then getio
        # sees its effect). Each send is a new Python process: on a loaded machine three
        # in a row took longer than a 10 s run of the fleet (device_not_connected).
        with ThreadPoolExecutor(2) as pool:
            to_3 = pool.submit(send, redis_url, IMEI_START + 3, "getver")
            to_5 = [
                send(redis_url, IMEI_START + 5, "setdigout 10", "--codec", "14"),
                send(redis_url, IMEI_START + 5, "getio"),
            ]
            sent = [to_3.result(), *to_5]
        code, summary = sim.result(timeout=60)
        _code, check = verify(sim.ledger_path, "--redis", redis_url)
    finally:
        server.stop()
    assert summary["command_in_place_of_ack"] == 0, summary["violations"]
    assert [result for result, _text in sent] == [0, 0, 0], sent
    assert f"IMEI:{IMEI_START + 3}" in sent[0][1]
    assert "DOUT1:1" in sent[1][1]
    assert "DO1:1 DO2:0" in sent[2][1]
    assert_nothing_lost(summary, check)
    assert code == 0
    assert summary["commands_answered"] == 3
    assert summary["nacks_sent"] == 0
