"""``teltonika simulate``: run a simulated tracker fleet against a server, then check it.

Examples::

    teltonika simulate --port 5027 --devices 200 --interval 5 --duration 60
    teltonika simulate --devices 50 --codec 8E --records-per-frame 4 --frames 20 \\
        --verify --redis redis://127.0.0.1:6379/0 --json
    teltonika simulate --devices 20 --duration 30 --ledger run.json      # check later:
    teltonika simulate --verify-only --ledger run.json --output teltonika-records.jsonl

Exit status: 0 when the server kept every promise; 1 when it broke one (a wrong ACK
count, an ACK of a frame sent corrupt on purpose, bytes that are neither an ACK nor a
command) or when ``--verify`` found an ACKed record missing from the sink; 2 for bad usage.
"""

from __future__ import annotations

import argparse
import resource
import socket
import sys
from collections.abc import Callable
from typing import Any, TextIO

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from teltonika.simulate.device import DeviceConfig
from teltonika.simulate.ledger import Ledger
from teltonika.simulate.source import parse_sources
from teltonika.simulate.verify import VerifyResult, verify_jsonl, verify_redis
from teltonika.wire import CODEC_8, CODEC_8E, CODEC_16

CODECS = {"8": CODEC_8, "8E": CODEC_8E, "8e": CODEC_8E, "16": CODEC_16}
DEFAULT_IMEI_START = 356307042440000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``teltonika simulate``."""
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    target = parser.add_argument_group("target")
    target.add_argument("--host", default="127.0.0.1", help="server host")
    target.add_argument(
        "--port", type=int, default=5027, help="server TCP (or, with --udp, UDP) port"
    )
    target.add_argument("--udp", action="store_true", help="report over UDP instead of TCP")
    target.add_argument(
        "--bind",
        default=None,
        metavar="ADDR[,ADDR...]",
        help="local addresses TCP devices connect from, in turn (e.g. "
        "127.0.0.2,127.0.0.3): one address holds at most ~28,000 connections to one "
        "server port; default: the system's choice",
    )
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument("--devices", type=int, default=10, help="number of devices")
    fleet.add_argument("--codec", choices=("8", "8E", "16"), default="8E", help="AVL codec")
    fleet.add_argument(
        "--records-per-frame", type=int, default=1, metavar="K", help="records per frame"
    )
    fleet.add_argument(
        "--interval",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between frames per device (jittered +-10%%); 0 = closed loop: the "
        "next frame as soon as the last is ACKed (for benchmarks)",
    )
    fleet.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="logging time in seconds (default 60 unless --frames is given)",
    )
    fleet.add_argument(
        "--frames", type=int, default=None, metavar="M", help="frames each device logs, then stop"
    )
    fleet.add_argument("--imei-start", type=int, default=DEFAULT_IMEI_START, help="first IMEI")
    fleet.add_argument("--seed", type=int, default=1, help="random seed (tracks, jitter, faults)")
    fleet.add_argument(
        "--connect-rate", type=float, default=500.0, metavar="N", help="devices booted per second"
    )
    fleet.add_argument(
        "--processes", type=int, default=1, metavar="P", help="split the fleet over P processes"
    )
    device = parser.add_argument_group("device behaviour")
    device.add_argument(
        "--ack-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="device response timeout: no ACK by then -> reconnect and resend",
    )
    device.add_argument(
        "--keepalive",
        type=float,
        default=60.0,
        metavar="S",
        help="send 0xFF after S idle seconds (0: never)",
    )
    device.add_argument(
        "--backoff-max", type=float, default=30.0, metavar="S", help="longest reconnect delay"
    )
    device.add_argument(
        "--corrupt-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="fraction of frames first sent with a broken CRC (must never be ACKed)",
    )
    device.add_argument(
        "--drain",
        type=float,
        default=None,
        metavar="S",
        help="after logging stops, wait up to S seconds for buffered records to be ACKed "
        "(default: twice --ack-timeout)",
    )
    report = parser.add_argument_group("report and ledger check")
    report.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    report.add_argument(
        "--progress",
        type=float,
        default=1.0,
        metavar="S",
        help="progress line on stderr every S seconds (0: none)",
    )
    report.add_argument("--ledger", default=None, metavar="PATH", help="save (or read) the ledger")
    report.add_argument(
        "--verify",
        action="store_true",
        help="after the run, check every ACKed record is in --redis or --output",
    )
    report.add_argument(
        "--verify-only", action="store_true", help="check a saved --ledger; simulate nothing"
    )
    report.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="Redis sink to verify against (redis:// or redis+sentinel://)",
    )
    report.add_argument(
        "--stream", default="telemetry:teltonika", help="stream name in the Redis sink"
    )
    report.add_argument(
        "--output", default=None, metavar="PATH", help="JSON lines sink file to verify against"
    )


def _usage(message: str) -> int:
    print(f"teltonika simulate: {message}", file=sys.stderr)
    return 2


def raise_open_files() -> int:
    """Raise this process's open-file soft limit to its hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def device_config(args: argparse.Namespace) -> DeviceConfig:
    return DeviceConfig(
        codec_id=CODECS[args.codec],
        records_per_frame=args.records_per_frame,
        interval_s=args.interval,
        ack_timeout_s=args.ack_timeout,
        keepalive_s=args.keepalive,
        corrupt_rate=args.corrupt_rate,
        backoff_max_s=args.backoff_max,
        max_frames=args.frames,
    )


def _check(args: argparse.Namespace) -> str | None:
    if (args.verify or args.verify_only) and bool(args.redis) == bool(args.output):
        return "--verify needs exactly one of --redis URL or --output PATH"
    if args.verify_only and not args.ledger:
        return "--verify-only needs --ledger PATH"
    if args.verify_only:
        return None
    if args.devices < 1:
        return "--devices must be at least 1"
    if not 1 <= args.records_per_frame <= 255:
        return "--records-per-frame must be 1..255"
    if args.interval < 0 or args.ack_timeout <= 0 or args.connect_rate <= 0:
        return "--interval must be >= 0, --ack-timeout and --connect-rate positive"
    if not 0.0 <= args.corrupt_rate < 1.0:
        return "--corrupt-rate must be in [0, 1)"
    if args.frames is not None and args.frames < 1:
        return "--frames must be at least 1"
    if args.processes < 1 or args.processes > args.devices:
        return "--processes must be between 1 and --devices"
    try:
        args.sources = parse_sources(args.bind)
    except ValueError as error:
        return str(error)
    if args.sources and args.udp:
        return "--bind applies to TCP devices only"
    return None


def run(args: argparse.Namespace) -> int:
    """Run the fleet (or only the check) and report; the exit status says who kept promises."""
    problem = _check(args)
    if problem:
        return _usage(problem)
    if args.duration is None and args.frames is None:
        args.duration = 60.0
    if args.drain is None:
        args.drain = 2 * args.ack_timeout
    raise_open_files()
    if args.verify_only:
        ledger = Ledger.load(args.ledger)
        result = _in_reactor(lambda reactor: _verify(args, ledger))
        return _report(args, ledger, result, sys.stdout)
    try:
        args.host = socket.gethostbyname(args.host)
    except OSError as error:
        return _usage(f"cannot resolve --host {args.host}: {error}")
    if args.processes > 1:
        ledger = _run_children(args)
        result = _in_reactor(lambda reactor: _verify(args, ledger)) if args.verify else None
    else:
        outcome: dict[str, Any] = {}

        async def main(reactor: Any) -> None:
            ledger = await _run_fleet(reactor, args, outcome)
            outcome["ledger"] = ledger
            if args.verify:
                outcome["result"] = await _verify(args, ledger)

        _in_reactor(lambda reactor: Deferred.fromCoroutine(main(reactor)))
        if "ledger" not in outcome:
            # Interrupted (SIGINT/SIGTERM stopped the reactor): report what we saw.
            outcome["fleet"].finish()
            outcome["ledger"] = outcome["fleet"].ledger
        ledger = outcome["ledger"]
        result = outcome.get("result")
    if args.ledger:
        ledger.save(args.ledger)
    return _report(args, ledger, result, sys.stdout)


def _in_reactor(start: Callable[[Any], Deferred[Any]]) -> Any:
    """Run the reactor until *start*'s Deferred fires; return its result or raise."""
    from twisted.internet import reactor

    box: dict[str, Any] = {}

    def go() -> None:
        d = start(reactor)

        def done(result: object) -> None:
            box["result"] = result
            reactor.stop()

        d.addBoth(done)

    reactor.callWhenRunning(go)
    reactor.run()
    result = box.get("result")
    if isinstance(result, Failure):
        result.raiseException()
    return result


async def _run_fleet(reactor: Any, args: argparse.Namespace, outcome: dict[str, Any]) -> Ledger:
    from teltonika.simulate.fleet import Fleet, FleetSettings

    fleet = Fleet(
        reactor,
        device_config(args),
        args.host,
        args.port,
        args.devices,
        args.imei_start,
        args.seed,
        FleetSettings(connect_rate=args.connect_rate, udp=args.udp, sources=args.sources),
    )
    outcome["fleet"] = fleet
    progress: LoopingCall | None = None
    if args.progress > 0:
        progress = LoopingCall(lambda: print(progress_line(fleet.ledger), file=sys.stderr))
        progress.clock = reactor
        progress.start(args.progress, now=False)
    try:
        return await fleet.run(args.duration, args.drain)
    finally:
        if progress is not None and progress.running:
            progress.stop()


def progress_line(ledger: Ledger) -> str:
    """One line of live figures for stderr."""
    c = ledger.counts
    latencies = sorted(ledger.latencies_ms[-5000:])
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
    return (
        f"online {ledger.online}/{ledger.devices}  frames sent {c['frames_sent']} "
        f"acked {c['frames_acked']} resent {c['resent']} rejected {c['rejected']}  "
        f"records acked {c['records_acked']}  ack p99 {p99:.1f} ms  "
        f"timeouts {c['ack_timeouts']} disconnects {c['disconnects']}  "
        f"broken promises {ledger.broken_promises}"
    )


def _child_argv(
    args: argparse.Namespace, index: int, devices: int, imei_start: int, ledger: str
) -> list[str]:
    argv = [
        "simulate", "--host", args.host, "--port", str(args.port),
        "--devices", str(devices), "--imei-start", str(imei_start),
        "--seed", f"{args.seed * 1000 + index}", "--codec", args.codec,
        "--records-per-frame", str(args.records_per_frame), "--interval", str(args.interval),
        "--connect-rate", str(args.connect_rate / args.processes),
        "--ack-timeout", str(args.ack_timeout), "--keepalive", str(args.keepalive),
        "--backoff-max", str(args.backoff_max), "--corrupt-rate", str(args.corrupt_rate),
        "--drain", str(args.drain), "--ledger", ledger,
        "--progress", str(args.progress if index == 0 else 0),
    ]  # fmt: skip
    if args.duration is not None:
        argv += ["--duration", str(args.duration)]
    if args.frames is not None:
        argv += ["--frames", str(args.frames)]
    if args.udp:
        argv.append("--udp")
    if args.sources:
        # Each child its own share of the addresses (all of them when fewer than children).
        mine = args.sources[index :: args.processes] or [args.sources[index % len(args.sources)]]
        argv += ["--bind", ",".join(mine)]
    return argv


def _run_children(args: argparse.Namespace) -> Ledger:
    from teltonika.simulate.fleet import run_processes

    def on_line(index: int, line: str) -> None:
        print(f"[process {index}] {line}", file=sys.stderr)

    return run_processes(
        lambda index, devices, start, path: _child_argv(args, index, devices, start, path),
        args.processes,
        args.devices,
        args.imei_start,
        on_line,
    )


def _verify(args: argparse.Namespace, ledger: Ledger) -> Deferred[Any]:
    if args.redis:
        return verify_redis(ledger, args.redis, args.stream)
    d: Deferred[Any] = Deferred()
    d.callback(verify_jsonl(ledger, args.output))
    return d


def _report(
    args: argparse.Namespace, ledger: Ledger, result: VerifyResult | None, out: TextIO
) -> int:
    summary = ledger.summary()
    if result is not None:
        summary["verify"] = result.as_dict()
    if args.json:
        out.write(orjson.dumps(summary).decode() + "\n")
    else:
        out.write(format_summary(summary))
    broken = ledger.broken_promises > 0 or (result is not None and not result.ok)
    return 1 if broken else 0


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable final summary."""
    s = summary
    lines = [
        f"devices {s['devices']}  elapsed {s['elapsed_s']} s",
        f"frames  sent {s['frames_sent']}  acked {s['frames_acked']}  resent {s['resent']}  "
        f"rejected {s['rejected']}  ({s['frames_per_s']}/s acked)",
        f"records sent {s['records_sent']}  acked {s['records_acked']}  "
        f"never acked {s['never_acked']}  ({s['records_per_s']}/s acked)",
        f"ack latency ms  p50 {s['ack_latency_ms_p50']}  p99 {s['ack_latency_ms_p99']}  "
        f"max {s['ack_latency_ms_max']}",
        f"sessions  connects {s['connects']}  failed {s['connect_failures']}  "
        f"disconnects {s['disconnects']}  ack timeouts {s['ack_timeouts']}  "
        f"logins ok {s['logins_accepted']} refused {s['logins_rejected']}",
        f"corrupt frames sent {s['corrupt_sent']}  refused {s['corrupt_rejected']}  "
        f"keepalives {s['keepalives_sent']}  commands {s['commands_received']} "
        f"(nACK {s['nacks_sent']})",
    ]
    if s["never_acked_sample"]:
        lines.append(f"never acked (first): {s['never_acked_sample']}")
    lines.append(
        f"broken promises {s['broken_promises']}  (wrong ACK {s['wrong_ack']}, corrupt ACKed "
        f"{s['corrupt_acked']}, unexpected bytes {s['unexpected_bytes']}, command in place "
        f"of an ACK {s['command_in_place_of_ack']})"
    )
    for violation in s["violations"]:
        lines.append(f"  ! {violation}")
    verify = s.get("verify")
    if verify is not None:
        lines.append(
            f"verify {verify['sink']}: acked {verify['acked']}  found {verify['found']}  "
            f"MISSING {verify['missing']}  duplicated {verify['duplicated']} "
            f"(+{verify['extra_copies']} copies)  entries {verify['entries']}"
        )
        if verify["missing_sample"]:
            lines.append(f"  missing (first): {verify['missing_sample']}")
    return "\n".join(lines) + "\n"
