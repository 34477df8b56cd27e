"""A plausible vehicle track and the IO values an FMB tracker samples with it.

Each simulated device drives: trips with the ignition on (speed varying, heading drifting,
odometer growing) alternate with parked periods (ignition off, speed 0, external voltage
lower, no movement). Records carry the IO elements real fleets send most
(docs/protocol.rst, section 'AVL record', and the catalogue): 239 ignition, 240 movement,
21 GSM signal, 66 external voltage (mV), 67 battery voltage (mV), 16 total odometer (m),
199 trip odometer (m), 24 speed (km/h);
codec 8 Extended adds an NX element (id 385, beacon data) and an id above 255. A change of
ignition produces an eventual record (event IO 239, priority 1) as a device does.

Everything comes from one seeded :class:`random.Random`, so a run is reproducible.
"""

from __future__ import annotations

import math
import random
from typing import Final

from teltonika.wire.records import CODEC_8E, CODEC_16, NX, AVLRecord, IOElement

EARTH_RADIUS_M: Final = 6_371_000.0
IO_IGNITION: Final = 239
IO_MOVEMENT: Final = 240
IO_GSM_SIGNAL: Final = 21
IO_EXTERNAL_VOLTAGE: Final = 66
IO_BATTERY_VOLTAGE: Final = 67
IO_TOTAL_ODOMETER: Final = 16
IO_TRIP_ODOMETER: Final = 199
IO_SPEED: Final = 24
IO_BEACONS: Final = 385
IO_ECO_SCORE: Final = 15
IO_ICCID_PART: Final = 11317

# Starting points spread over a few European cities, so tracks look real on a map.
_CITIES: Final = (
    (54.6872, 25.2797),  # Vilnius
    (52.2297, 21.0122),  # Warsaw
    (50.0755, 14.4378),  # Prague
    (48.1351, 11.5820),  # Munich
    (45.4642, 9.1900),  # Milan
    (-33.8688, 151.2093),  # Sydney: south and east, negative latitude on the wire
    (40.4168, -3.7038),  # Madrid: negative longitude
)


class Track:
    """One device's position and IO state, advanced record by record.

    :param rng: the device's own random source.
    :param codec_id: which AVL codec the records must fit (8 allows only ids up to 255
        and no NX elements; 16 carries a generation type).
    """

    def __init__(self, rng: random.Random, codec_id: int) -> None:
        self.rng = rng
        self.codec_id = codec_id
        lat, lon = rng.choice(_CITIES)
        self.latitude = lat + rng.uniform(-0.05, 0.05)
        self.longitude = lon + rng.uniform(-0.05, 0.05)
        self.altitude = rng.randint(80, 300)
        self.heading = rng.uniform(0, 360)
        self.speed = 0.0
        self.ignition = rng.random() < 0.7
        self.phase_left_s = rng.uniform(60, 900)
        self.total_odometer_m = rng.randint(10_000_000, 400_000_000)
        self.trip_odometer_m = 0
        self.gsm_signal = rng.randint(3, 5)
        self.battery_mv = rng.randint(3900, 4150)
        self.satellites = rng.randint(7, 14)
        self.last_ms: int | None = None

    def advance(self, seconds: float) -> bool:
        """Move the vehicle on by *seconds*; return True when the ignition changed."""
        changed = False
        self.phase_left_s -= seconds
        if self.phase_left_s <= 0:
            self.ignition = not self.ignition
            changed = True
            self.phase_left_s = (
                self.rng.uniform(300, 2400) if self.ignition else self.rng.uniform(120, 1800)
            )
            if self.ignition:
                self.trip_odometer_m = 0
        if self.ignition:
            target = self.rng.choice((30.0, 50.0, 50.0, 70.0, 90.0, 0.0))
            self.speed = max(0.0, min(130.0, self.speed + (target - self.speed) * 0.3))
            self.heading = (self.heading + self.rng.gauss(0, 15)) % 360
            distance = self.speed / 3.6 * seconds
            self._move(distance)
            self.total_odometer_m += int(distance)
            self.trip_odometer_m += int(distance)
            self.altitude = max(-20, min(2000, self.altitude + self.rng.randint(-2, 2)))
        else:
            self.speed = 0.0
        if self.rng.random() < 0.05:
            self.gsm_signal = max(1, min(5, self.gsm_signal + self.rng.choice((-1, 1))))
        if self.rng.random() < 0.1:
            self.satellites = max(4, min(18, self.satellites + self.rng.choice((-1, 1))))
        return changed

    def _move(self, distance_m: float) -> None:
        """Great-circle step of *distance_m* along the heading."""
        lat1 = math.radians(self.latitude)
        lon1 = math.radians(self.longitude)
        bearing = math.radians(self.heading)
        delta = distance_m / EARTH_RADIUS_M
        lat2 = math.asin(
            math.sin(lat1) * math.cos(delta) + math.cos(lat1) * math.sin(delta) * math.cos(bearing)
        )
        lon2 = lon1 + math.atan2(
            math.sin(bearing) * math.sin(delta) * math.cos(lat1),
            math.cos(delta) - math.sin(lat1) * math.sin(lat2),
        )
        self.latitude = max(-89.9, min(89.9, math.degrees(lat2)))
        self.longitude = (math.degrees(lon2) + 540) % 360 - 180

    def log(self, now: float, elapsed: float, count: int) -> list[AVLRecord]:
        """*count* records spread evenly over the last *elapsed* seconds up to *now*, the
        way a tracker samples between two sends (oldest first)."""
        step = elapsed / count
        now_ms = int(now * 1000)
        out = []
        for index in range(count):
            event = self.advance(step)
            stamp = now_ms - int((count - 1 - index) * step * 1000)
            out.append(self.record(stamp, event=event))
        return out

    def record(self, timestamp_ms: int, event: bool = False) -> AVLRecord:
        """The record a device would log now.

        Timestamps are kept strictly increasing per device (the ledger and the sink's
        deduplication key on ``(imei, timestamp_ms)``), even if the clock repeats.

        :param event: an eventual record (ignition change) rather than a periodic one.
        """
        if self.last_ms is not None and timestamp_ms <= self.last_ms:
            timestamp_ms = self.last_ms + 1
        self.last_ms = timestamp_ms
        speed = round(self.speed)
        external_mv = (
            self.rng.randint(13600, 14400) if self.ignition else self.rng.randint(12100, 12700)
        )
        io: list[IOElement] = [
            (IO_IGNITION, 1, int(self.ignition)),
            (IO_MOVEMENT, 1, int(speed > 0)),
            (IO_GSM_SIGNAL, 1, self.gsm_signal),
            (IO_SPEED, 2, speed),
            (IO_EXTERNAL_VOLTAGE, 2, external_mv),
            (IO_BATTERY_VOLTAGE, 2, self.battery_mv + self.rng.randint(-20, 20)),
            (IO_TOTAL_ODOMETER, 4, self.total_odometer_m),
            (IO_TRIP_ODOMETER, 4, self.trip_odometer_m),
        ]
        if self.codec_id in (CODEC_8E, CODEC_16):
            io.append((IO_ECO_SCORE, 2, self.rng.randint(0, 100)))
            io.append((IO_ICCID_PART, 8, self.rng.getrandbits(63)))
        if self.codec_id == CODEC_8E and self.rng.random() < 0.3:
            io.append((IO_BEACONS, NX, self.rng.randbytes(self.rng.choice((8, 20, 42)))))
        # In wire order (grouped by width, NX last), as a device writes and a decoder returns.
        io.sort(key=lambda element: (element[1] == NX, element[1]))
        fix = self.satellites >= 4
        return AVLRecord(
            timestamp_ms=timestamp_ms,
            priority=1 if event else 0,
            longitude=round(self.longitude, 7),
            latitude=round(self.latitude, 7),
            altitude=self.altitude,
            angle=round(self.heading) % 360 if speed else 0,
            satellites=self.satellites if fix else 0,
            speed=speed,
            event_io_id=IO_IGNITION if event else 0,
            io=tuple(io),
            generation_type=(7 if not event else 6) if self.codec_id == CODEC_16 else None,
        )
