"""What the fleet saw: counters, ACK latencies, and the ledger of ACKed records.

The ledger is the simulator's proof obligation on the server: every record in it was
ACKed, so the server promised it was durable. :mod:`teltonika.simulate.verify` later
looks for each one in the sink. A record is identified by ``(imei, timestamp_ms)``; the
track keeps timestamps strictly increasing per device, so the pair is unique.

Promises the server can break (each is a *violation*, and makes the run exit non-zero):

* ``wrong_ack``: an ACK count that is neither the number of records sent nor 0;
* ``corrupt_acked``: a non-zero ACK for a frame sent corrupt on purpose (``--corrupt-rate``);
* ``unexpected_bytes``: bytes that are neither an ACK we wait for nor a command frame;
* ``command_in_place_of_ack``: a command frame where the device awaited an ACK (a tracker
  reads its first four bytes as "ACK 0" and the rest as garbage);
* ``acked_missing``: (from the verify step) an ACKed record absent from the sink.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import attrs
import orjson

from teltonika.wire.records import AVLRecord

LEDGER_VERSION: Final = 1
MAX_VIOLATION_DETAILS: Final = 50

COUNTERS: Final = (
    "frames_sent",
    "frames_acked",
    "records_sent",
    "records_acked",
    "resent",
    "rejected",
    "corrupt_sent",
    "corrupt_rejected",
    "ack_timeouts",
    "connects",
    "connect_failures",
    "disconnects",
    "logins_accepted",
    "logins_rejected",
    "keepalives_sent",
    "commands_received",
    "commands_answered",
    "nacks_sent",
    "wrong_ack",
    "corrupt_acked",
    "unexpected_bytes",
    "command_in_place_of_ack",
)
"""Counter names; each is a key of the summary."""

VIOLATIONS: Final = ("wrong_ack", "corrupt_acked", "unexpected_bytes", "command_in_place_of_ack")


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@attrs.define
class Ledger:
    """Counters and records of one fleet (one process, or several merged).

    :ivar counts: the :data:`COUNTERS`, by name.
    :ivar acked: ``{imei: [timestamp_ms, ...]}`` of every record the server ACKed.
    :ivar never_acked: filled at the end of a run: records still unACKed in device buffers.
    :ivar latencies_ms: one entry per ACKed frame: send (last write) to ACK, milliseconds.
    :ivar violations: human-readable details of broken promises (the first few).
    :ivar devices: number of simulated devices.
    :ivar online: devices logged in right now (for the progress line).
    """

    counts: dict[str, int] = attrs.Factory(lambda: dict.fromkeys(COUNTERS, 0))
    acked: dict[str, list[int]] = attrs.Factory(dict)
    never_acked: dict[str, list[int]] = attrs.Factory(dict)
    latencies_ms: list[float] = attrs.Factory(list)
    violations: list[str] = attrs.Factory(list)
    devices: int = 0
    online: int = 0
    elapsed_s: float = 0.0

    def count(self, name: str, amount: int = 1) -> None:
        """Add *amount* to counter *name* (one of :data:`COUNTERS`)."""
        self.counts[name] += amount

    def violation(self, name: str, detail: str) -> None:
        """Record a broken promise: count it under *name*, keep the first details."""
        self.counts[name] += 1
        if len(self.violations) < MAX_VIOLATION_DETAILS:
            self.violations.append(detail)

    def ack(self, imei: str, timestamps: Iterable[int], latency_ms: float) -> None:
        """A frame of records was ACKed with the right count."""
        stamps = list(timestamps)
        self.acked.setdefault(imei, []).extend(stamps)
        self.counts["frames_acked"] += 1
        self.counts["records_acked"] += len(stamps)
        self.latencies_ms.append(latency_ms)

    @property
    def broken_promises(self) -> int:
        """How many times the server broke a promise (see the module docstring)."""
        return sum(self.counts[name] for name in VIOLATIONS)

    def add_never_acked(self, imei: str, records: Iterable[AVLRecord]) -> None:
        """A device stopped with *records* still unACKed in its buffer."""
        stamps = [record.timestamp_ms for record in records]
        if stamps:
            self.never_acked.setdefault(imei, []).extend(stamps)

    def summary(self) -> dict[str, Any]:
        """The run's summary as a flat JSON-ready dict (what ``--json`` prints)."""
        latencies = sorted(self.latencies_ms)
        out: dict[str, Any] = {"devices": self.devices}
        out.update(self.counts)
        out["ack_latency_ms_p50"] = round(percentile(latencies, 0.50), 3)
        out["ack_latency_ms_p99"] = round(percentile(latencies, 0.99), 3)
        out["ack_latency_ms_max"] = round(latencies[-1], 3) if latencies else 0.0
        out["never_acked"] = sum(len(v) for v in self.never_acked.values())
        out["never_acked_sample"] = [
            [imei, stamp] for imei, stamps in sorted(self.never_acked.items()) for stamp in stamps
        ][:10]
        out["broken_promises"] = self.broken_promises
        out["violations"] = self.violations[:10]
        out["elapsed_s"] = round(self.elapsed_s, 3)
        out["records_per_s"] = (
            round(self.counts["records_acked"] / self.elapsed_s, 1) if self.elapsed_s else 0.0
        )
        out["frames_per_s"] = (
            round(self.counts["frames_acked"] / self.elapsed_s, 1) if self.elapsed_s else 0.0
        )
        return out

    def merge(self, other: Ledger) -> None:
        """Fold another process's ledger into this one (the fleet runner's parent does)."""
        for name, value in other.counts.items():
            self.counts[name] = self.counts.get(name, 0) + value
        for imei, stamps in other.acked.items():
            self.acked.setdefault(imei, []).extend(stamps)
        for imei, stamps in other.never_acked.items():
            self.never_acked.setdefault(imei, []).extend(stamps)
        self.latencies_ms.extend(other.latencies_ms)
        self.violations.extend(other.violations[: MAX_VIOLATION_DETAILS - len(self.violations)])
        self.devices += other.devices
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "version": LEDGER_VERSION,
                "devices": self.devices,
                "elapsed_s": self.elapsed_s,
                "counts": self.counts,
                "acked": self.acked,
                "never_acked": self.never_acked,
                "latencies_ms": self.latencies_ms,
                "violations": self.violations,
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> Ledger:
        """Read a ledger written by :meth:`to_json`.

        :raise ValueError: not a ledger of a version this code reads.
        """
        raw = orjson.loads(data)
        if not isinstance(raw, dict) or raw.get("version") != LEDGER_VERSION:
            raise ValueError("not a teltonika simulate ledger (version 1)")
        ledger = cls()
        ledger.devices = int(raw["devices"])
        ledger.elapsed_s = float(raw["elapsed_s"])
        ledger.counts.update({str(k): int(v) for k, v in raw["counts"].items()})
        ledger.acked = {str(k): [int(s) for s in v] for k, v in raw["acked"].items()}
        ledger.never_acked = {str(k): [int(s) for s in v] for k, v in raw["never_acked"].items()}
        ledger.latencies_ms = [float(v) for v in raw["latencies_ms"]]
        ledger.violations = [str(v) for v in raw["violations"]]
        return ledger

    def save(self, path: str | Path) -> None:
        """Write the ledger atomically (temporary file, then rename)."""
        target = Path(path)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_bytes(self.to_json())
        temporary.replace(target)

    @classmethod
    def load(cls, path: str | Path) -> Ledger:
        return cls.from_json(Path(path).read_bytes())
