"""What a simulated FMB tracker answers to SMS/GPRS commands (codec 12 and 14 payloads).

The texts follow the shapes of the replies documented on the Teltonika wiki
(docs/protocol.rst, sections 'Codec 12' and 'Codec 14'): ``getinfo`` -> ``RTC:...
Init:... UpTime:...``, ``getver`` -> ``Ver:... GPS:... Hw:... IMEI:...``, ``getio`` ->
``DI1:... DO1:...``.
``setdigout`` changes the device's digital outputs, so a later ``getio`` or ``getstatus``
shows the new state, as on a real device. An unknown command gets a short text reply
rather than silence, so a server's command path is always exercised end to end.
"""

from __future__ import annotations

import time

import attrs

from teltonika.simulate.track import Track

FIRMWARE: str = "03.29.00_00"
HARDWARE: str = "FMB920"


@attrs.define
class SimulatedDeviceState:
    """The bits of device state that commands read or change.

    :ivar imei: the device's IMEI.
    :ivar started_s: wall time the device booted, for the uptime.
    :ivar outputs: digital output states DOUT1, DOUT2.
    """

    imei: str
    started_s: float
    outputs: list[int] = attrs.Factory(lambda: [0, 0])


def answer(
    command: str, state: SimulatedDeviceState, track: Track, now_s: float, buffered: int
) -> str:
    """The reply text a device sends to *command*.

    :param now_s: the device's wall clock, seconds since the epoch.
    :param buffered: records waiting in the device's buffer (``getinfo`` reports them).
    """
    words = command.strip().split()
    name = words[0].lower() if words else ""
    uptime = int(now_s - state.started_s)
    rtc = time.strftime("%Y/%m/%d %H:%M", time.gmtime(now_s))
    if name == "getinfo":
        return (
            f"RTC:{rtc} Init:{time.strftime('%Y/%m/%d %H:%M', time.gmtime(state.started_s))} "
            f"UpTime:{uptime}s PWR:PwrVoltage RST:0 GPS:{3 if track.satellites >= 4 else 1} "
            f"SAT:{track.satellites} TTFF:14 TTLL:0 NOGPS:0:0 SR:0 FG:0 FL:0 SMS:0 "
            f"REC:{buffered} MD:0 DB:0"
        )
    if name == "getver":
        return (
            f"Ver:{FIRMWARE} GPS:AXN_5.1.6 Hw:{HARDWARE} Mod:17 IMEI:{state.imei} "
            f"Init:{rtc} Uptime:{uptime} MAC:001E42{state.imei[-6:]} SPC:1(0) AXL:0 OBD:0 "
            "BL:1.10 BT:4"
        )
    if name == "getstatus":
        return (
            f"Data Link: 1 GPRS: 1 Phone: 0 SIM: 0 OpCode: 24602 Signal: {track.gsm_signal} "
            "NewSMS: 0 Roaming: 0 SMSFull: 0 LAC: 1 Cell ID: 3055 NetType: 1 FwUpd:-1"
        )
    if name == "getio":
        return (
            f"DI1:{int(track.ignition)} DI2:0 DI3:0 AIN1:0 AIN2:{12000 + track.gsm_signal} "
            f"DO1:{state.outputs[0]} DO2:{state.outputs[1]}"
        )
    if name == "getgps":
        return (
            f"GPS:1 Sat:{track.satellites} Lat:{track.latitude:.6f} Long:{track.longitude:.6f} "
            f"Alt:{track.altitude} Speed:{round(track.speed)} Dir:{round(track.heading)} "
            f"Date: {time.strftime('%Y/%m/%d', time.gmtime(now_s))} "
            f"Time: {time.strftime('%H:%M:%S', time.gmtime(now_s))}"
        )
    if name == "setdigout":
        return _setdigout(words[1:], state)
    return f"Unknown command: {command.strip()[:64]}"


def _setdigout(arguments: list[str], state: SimulatedDeviceState) -> str:
    """``setdigout 10`` sets DOUT1=1, DOUT2=0; ``?`` keeps an output as it is."""
    if not arguments or not all(c in "01?" for c in arguments[0]):
        return "Wrong param: setdigout expects 0, 1 or ? per output"
    parts = []
    for index, char in enumerate(arguments[0][: len(state.outputs)]):
        if char != "?":
            state.outputs[index] = int(char)
            parts.append(f"DOUT{index + 1}:{char} Timeout:INFINITY")
        else:
            parts.append(f"DOUT{index + 1}:IGNORED")
    return " ".join(parts)
