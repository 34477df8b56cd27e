"""Many simulated devices in one reactor, and several processes for more.

One reactor comfortably drives hundreds (idle: thousands) of device connections; above
that, or to keep the simulator off the server's core, :func:`run_processes` starts child
processes of ``teltonika simulate`` and merges their ledgers.

A run has three phases: *ramp* (devices boot at ``connect_rate`` per second), *logging*
(until ``duration_s`` passes, or every device has logged ``max_frames`` frames), and
*drain* (no new records; buffered ones are still sent, until all are ACKed or
``drain_s`` passes). Records still buffered at the end are reported as never ACKed.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import ClientFactory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from teltonika.simulate.device import Device, DeviceConfig, SimulatedDeviceProtocol
from teltonika.simulate.ledger import Ledger
from teltonika.simulate.source import connect_from
from teltonika.simulate.udp import UDPDevice, UDPDeviceProtocol

POLL_S = 0.05


class _Device(TypingProtocol):
    @property
    def drained(self) -> bool: ...
    def stop_generating(self) -> None: ...
    def stop(self) -> None: ...


class SimulatedDeviceFactory(ClientFactory):
    """One factory per device: failed connects go back to the device's backoff."""

    noisy = False

    def __init__(self, device: Device) -> None:
        self.device = device

    def buildProtocol(self, addr: IAddress | None) -> TwistedProtocol:
        return SimulatedDeviceProtocol(self.device)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.device.connect_failed()


def imei_for(start: int, index: int) -> str:
    """The *index*-th device's IMEI: ``start + index`` as 15 digits."""
    return f"{start + index:015d}"


@attrs.frozen
class FleetSettings:
    """How a :class:`Fleet`'s devices reach the server (``teltonika simulate`` fills it
    from ``--connect-rate``, ``--udp`` and ``--source``).

    :ivar connect_rate: devices booted per second during the ramp.
    :ivar udp: the devices speak UDP to the port instead of TCP.
    :ivar sources: local addresses TCP devices connect from, device *i* from
        ``sources[i % len(sources)]`` (:mod:`teltonika.simulate.source`); empty: the
        system's choice.
    """

    connect_rate: float = 500.0
    udp: bool = False
    sources: Sequence[str] = ()


class Fleet:
    """Devices sharing one reactor and one :class:`Ledger`.

    :param reactor: provides IReactorTime plus IReactorTCP (and IReactorUDP with
        ``settings.udp``).
    :param devices: how many devices; device *i* has the IMEI ``imei_for(imei_start, i)``
        and its own random generator seeded from *seed* and *i*.
    :param settings: the ramp's rate, TCP or UDP, and the source addresses.
    """

    def __init__(
        self,
        reactor: object,
        config: DeviceConfig,
        host: str,
        port: int,
        devices: int,
        imei_start: int,
        seed: int,
        settings: FleetSettings = FleetSettings(),
    ) -> None:
        udp, sources = settings.udp, settings.sources
        self.reactor = reactor
        self.clock: IReactorTime = reactor  # type: ignore[assignment]
        self.config = config
        self.host = host
        self.port = port
        self.udp = udp
        self.connect_rate = settings.connect_rate
        self.ledger = Ledger()
        self.ledger.devices = devices
        self.devices: list[_Device] = []
        self._tcp: list[Device] = []
        self._udp: list[UDPDevice] = []
        for index in range(devices):
            rng = random.Random(f"{seed}:{index}")
            imei = imei_for(imei_start, index)
            if udp:
                udp_device = UDPDevice(imei, config, self.clock, rng, self.ledger)
                self._udp.append(udp_device)
                self.devices.append(udp_device)
            else:
                source = sources[index % len(sources)] if sources else None
                device = Device(
                    imei,
                    config,
                    self.clock,
                    rng,
                    self.ledger,
                    self._connector(source),
                )
                self._tcp.append(device)
                self.devices.append(device)
        self._booted = 0
        self._started_at = 0.0
        self._done: Deferred[Ledger] = Deferred()
        self._watch: LoopingCall | None = None
        self._stop_call: IDelayedCall | None = None
        self._drain_deadline: float | None = None
        self._drain_s = 0.0
        self._finished = False

    def _connector(self, source: str | None) -> Callable[[Device], None]:
        def connect(device: Device) -> None:
            self._connect_tcp(device, source)

        return connect

    def _connect_tcp(self, device: Device, source: str | None) -> None:
        connect_from(self.reactor, source, self.host, self.port, SimulatedDeviceFactory(device), 10)

    def _boot(self, index: int) -> None:
        if self._finished:
            return
        if self.udp:
            device = self._udp[index]
            protocol = UDPDeviceProtocol(device, self.host, self.port)
            self.reactor.listenUDP(0, protocol)  # type: ignore[attr-defined]
        else:
            self._tcp[index].start()
        self._booted += 1

    def run(self, duration_s: float | None, drain_s: float) -> Deferred[Ledger]:
        """Boot the fleet; fire with the ledger when logging and draining are over.

        :param duration_s: logging time after the first boot; None means until every
            device has logged its ``max_frames``.
        :param drain_s: how long to wait for buffered records to be ACKed at the end.
        """
        self._started_at = self.clock.seconds()
        self._drain_s = drain_s
        for index in range(len(self.devices)):
            self.clock.callLater(index / self.connect_rate, self._boot, index)
        if duration_s is not None:
            self._stop_call = self.clock.callLater(duration_s, self.stop_logging)
        watch = LoopingCall(self._check)
        watch.clock = self.clock
        self._watch = watch
        watch.start(POLL_S, now=False)
        return self._done

    def stop_logging(self) -> None:
        """End the logging phase: devices log no more; the drain starts."""
        if self._drain_deadline is not None:
            return
        if self._stop_call is not None and self._stop_call.active():
            self._stop_call.cancel()
        for device in self.devices:
            device.stop_generating()
        self._drain_deadline = self.clock.seconds() + self._drain_s

    def _check(self) -> None:
        if self._finished:
            return
        if self._drain_deadline is None:
            if self._booted == len(self.devices) and self._all_logged():
                self.stop_logging()
            return
        drained = all(device.drained for device in self.devices)
        if drained or self.clock.seconds() >= self._drain_deadline:
            self.finish()

    def _all_logged(self) -> bool:
        if self.config.max_frames is None:
            return False
        return all(not getattr(d, "generating", False) for d in self.devices)

    def finish(self) -> None:
        """Power every device off and fire the run's Deferred."""
        if self._finished:
            return
        self._finished = True
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        for device in self.devices:
            device.stop()
        self.ledger.elapsed_s = self.clock.seconds() - self._started_at
        self._done.callback(self.ledger)


def run_processes(
    child_argv: Callable[[int, int, int, str], Sequence[str]],
    processes: int,
    devices: int,
    imei_start: int,
    on_line: Callable[[int, str], None] | None = None,
) -> Ledger:
    """Split *devices* over *processes* children of ``teltonika simulate``; merge their ledgers.

    :param child_argv: ``(index, devices, imei_start, ledger_path) -> argv`` for one child.
    :param on_line: called with each child's stderr lines (progress), tagged by index.
    :raise RuntimeError: a child failed without writing its ledger.
    """
    per, extra = divmod(devices, processes)
    directory = Path(tempfile.mkdtemp(prefix="teltonika-simulate-"))
    children: list[tuple[subprocess.Popen[bytes], Path]] = []
    offset = 0
    for index in range(processes):
        count = per + (1 if index < extra else 0)
        path = directory / f"ledger-{index}.json"
        argv = [
            sys.executable,
            "-m",
            "teltonika",
            *child_argv(index, count, imei_start + offset, str(path)),
        ]
        children.append(
            (subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), path)
        )
        offset += count
    readers = []
    for index, (child, _path) in enumerate(children):
        reader = threading.Thread(target=_forward, args=(child, index, on_line), daemon=True)
        reader.start()
        readers.append(reader)
    merged = Ledger()
    failures = []
    for index, (child, path) in enumerate(children):
        child.wait()
        readers[index].join(5)
        if not path.exists():
            failures.append(f"child {index} exited {child.returncode} without a ledger")
            continue
        merged.merge(Ledger.load(path))
        path.unlink()
    shutil.rmtree(directory, ignore_errors=True)
    if failures:
        raise RuntimeError("; ".join(failures))
    return merged


def _forward(
    child: subprocess.Popen[bytes], index: int, on_line: Callable[[int, str], None] | None
) -> None:
    """Read a child's stderr to the end (so it never blocks on a full pipe)."""
    assert child.stderr is not None
    for raw in child.stderr:
        if on_line is not None:
            on_line(index, raw.decode("utf-8", "replace").rstrip())
