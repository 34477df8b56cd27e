"""``teltonika send``: one command to one tracker through Redis, and its answer.

    teltonika send --redis redis://host:6379/0 352093081452251 'getinfo'
    teltonika send --redis URL IMEI 'getver' --codec 14 --timeout 20
    teltonika send --redis URL IMEI 'setdigout 1' --expires 10
    teltonika send --redis URL IMEI 'setdigout 1' --wait-for-device 3600

It looks the device up in ``connections:registry``, publishes the command to the stream
of the instance holding its socket, waits on ``commands:responses`` for the command's
terminal status, prints the reply text and exits 0. A failure prints ``failed: REASON``
to stderr with what the reason means and whether the device may have run the command,
and exits 1; no answer in time exits 2 and says whether the command can still
run; bad arguments or an unreachable Redis exit 3.

Every command gets an expiry, so that it never runs after its sender gave up: by default
the time by which it should have been written (the commands queued ahead of it on the
device's socket, each with its timeout, the instance's quiet and settle intervals, and a
routing margin; the instance announces its timings in its heartbeat), or ``--expires S``.
``send`` waits until the expiry plus the command's own timeout. ``--no-expiry`` lets the
command be written whenever its turn comes, however late. With ``--wait-for-device S``
the command is kept (in Redis) for the device's next login for at most S seconds.
There is no HTTP anywhere: Redis is the only way in.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import TYPE_CHECKING, Any, Final

import attrs

from teltonika.commands.messages import FAILED, Command

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from teltonika.redis.connect import AnyRedisAddress
    from teltonika.redis.connection import RedisConnection

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_NO_ANSWER: Final = 2
EXIT_USAGE: Final = 3
CONNECT_TIMEOUT: Final = 5.0
MARGIN: Final = 5.0
"""Seconds ``send`` waits beyond the command's own deadline (routing and Redis time)."""
DEFAULT_TIMEOUT: Final = 30.0
"""The reply timeout assumed for an offline command (its instance is not known yet)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("imei", help="the tracker's IMEI (15 digits)")
    parser.add_argument("command", help="the command text, e.g. getinfo, 'setdigout 1'")
    parser.add_argument(
        "--redis",
        required=True,
        metavar="URL",
        help="redis://host:port/db, or redis+sentinel://host:port[,host:port...]/SERVICE[/db]",
    )
    parser.add_argument(
        "--codec",
        choices=("12", "14"),
        default="12",
        help="12 (default) or 14 (the device checks the IMEI)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds the server waits for the device's reply "
        "(default: the server's --command-timeout, 30)",
    )
    parser.add_argument(
        "--wait-for-device",
        type=float,
        default=None,
        metavar="S",
        help="keep the command for the device's next login, at most S "
        "seconds (offline delivery); required expiry, never infinite",
    )
    parser.add_argument(
        "--expires",
        type=float,
        default=None,
        metavar="S",
        help="the server writes the command within S seconds or never (default: by when "
        "it should have been written, from the commands queued ahead of it); 0 means "
        "never expires and needs --no-expiry",
    )
    parser.add_argument(
        "--no-expiry",
        action="store_true",
        help="no expiry: the command is written whenever its turn comes, even after send gave up",
    )
    parser.add_argument("--hex", action="store_true", help="COMMAND is hex bytes rather than text")
    parser.add_argument("--id", default=None, help="command id (default: a random one)")
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="do not print progress statuses to stderr"
    )


def run(args: argparse.Namespace) -> int:
    """Send the command; see the module docstring for exit codes."""
    from teltonika.commands.client import new_command_id
    from teltonika.redis.connect import RedisURLError, parse_redis_url

    try:
        address = parse_redis_url(args.redis)
    except RedisURLError as error:
        print(f"teltonika send: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        payload = bytes.fromhex(args.command) if args.hex else args.command.encode("ascii")
    except (ValueError, UnicodeEncodeError):
        print("teltonika send: the command must be ASCII text (or hex with --hex)", file=sys.stderr)
        return EXIT_USAGE
    if args.timeout is not None and not 0 < args.timeout <= 3600:
        print("teltonika send: --timeout must be in (0, 3600]", file=sys.stderr)
        return EXIT_USAGE
    if args.wait_for_device is not None and args.wait_for_device <= 0:
        print("teltonika send: --wait-for-device must be > 0 seconds", file=sys.stderr)
        return EXIT_USAGE
    problem = _expiry_problem(args)
    if problem:
        print(f"teltonika send: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        command = Command(
            id=args.id or new_command_id(),
            imei=args.imei,
            payload=payload,
            codec=args.codec,
            timeout_s=args.timeout,
        )
        Command.from_fields(command.fields())  # the consumer's own validation
    except Exception as error:
        print(f"teltonika send: invalid command: {error}", file=sys.stderr)
        return EXIT_USAGE

    from twisted.internet import task
    from twisted.internet.defer import Deferred

    outcome: dict[str, Any] = {"status": EXIT_USAGE}

    def main(reactor: IReactorTime) -> Deferred[None]:
        return Deferred.fromCoroutine(_send(reactor, address, command, args, outcome))

    try:
        task.react(main)
    except SystemExit as done:
        if done.code not in (0, None):
            return EXIT_USAGE
    status: int = outcome["status"]
    return status


def _expiry_problem(args: argparse.Namespace) -> str:
    """Why the expiry options cannot be used together, or ``""``."""
    expires, never = args.expires, args.no_expiry
    if args.wait_for_device is not None and (expires is not None or never):
        return "--wait-for-device S is the expiry of an offline command; drop --expires"
    if expires is not None and (expires < 0 or expires > 30 * 86400):
        return "--expires must be between 0 and 2592000 seconds"
    if expires == 0 and not never:
        return (
            "--expires 0 means the command may run at any later time, even after send "
            "gave up; add --no-expiry to confirm"
        )
    if expires and never:
        return "--expires S and --no-expiry contradict each other"
    return ""


def _describe(error: BaseException) -> str:
    """A plain sentence for an error met while talking to Redis."""
    from twisted.internet import defer

    if isinstance(error, TimeoutError | defer.TimeoutError):
        return "Redis did not answer in time"
    if isinstance(error, ConnectionError):
        return f"lost the connection to Redis ({error})"
    return str(error) or type(error).__name__


def _clock_time(seconds: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(seconds))


async def _send(
    reactor: IReactorTime,
    address: AnyRedisAddress,
    command: Command,
    args: argparse.Namespace,
    outcome: dict[str, Any],
) -> None:
    from twisted.internet import defer
    from twisted.internet.defer import maybeDeferred

    from teltonika.redis.connect import lazy_connection

    redis = lazy_connection(address, connect_timeout=CONNECT_TIMEOUT)
    reader = lazy_connection(address, connect_timeout=CONNECT_TIMEOUT)
    try:
        try:
            # txredisapi waits for a connection forever: bound the first contact.
            try:
                for conn in (redis, reader):
                    await maybeDeferred(conn.ping).addTimeout(CONNECT_TIMEOUT, reactor)
            except (TimeoutError, defer.TimeoutError):
                print(
                    f"teltonika send: Redis at {address} did not answer within "
                    f"{CONNECT_TIMEOUT:g} s",
                    file=sys.stderr,
                )
                outcome["status"] = EXIT_USAGE
                return
            await _deliver(reactor, redis, reader, command, args, outcome)
        except Exception as error:
            print(f"teltonika send: Redis error: {_describe(error)}", file=sys.stderr)
            outcome["status"] = EXIT_USAGE
    finally:
        for conn in (redis, reader):
            with contextlib.suppress(Exception):  # closing at exit: nothing to recover
                await conn.disconnect()


async def _deliver(
    reactor: IReactorTime,
    redis: RedisConnection,
    reader: RedisConnection,
    command: Command,
    args: argparse.Namespace,
    outcome: dict[str, Any],
) -> None:
    """Publish *command* with its expiry, wait for its terminal status, report it."""
    from teltonika.commands.client import (
        last_response_id,
        publish_command,
        publish_not_connected,
        route_of,
        store_offline,
        timeout_of,
        unsettled_commands,
        wait_for_terminal,
        write_window,
    )
    from teltonika.commands.messages import offline_command

    seen: list[str] = []

    def progress(fields: dict[str, str]) -> None:
        seen.append(fields.get("status", ""))
        if not args.quiet and fields.get("status") not in ("responded", "failed"):
            print(f"{fields.get('status')} ({fields.get('instance_id')})", file=sys.stderr)

    now = reactor.seconds()
    now_ms = int(now * 1000)
    after = await last_response_id(redis)
    if await redis.exists(offline_command(command.id)):
        _duplicate(command.id, "an offline command with this id is stored", outcome)
        return
    if args.wait_for_device is not None:
        offline_expiry = now + args.wait_for_device
        expires: float | None = offline_expiry
        own_timeout = command.timeout_s if command.timeout_s is not None else DEFAULT_TIMEOUT
        command = attrs.evolve(
            command, offline=True, expires_at_ms=_ms(offline_expiry), created_at_ms=now_ms
        )
        try:
            await store_offline(redis, command, now_ms)
        except ValueError:
            _duplicate(command.id, "an offline command with this id is stored", outcome)
            return
        deadline = now + args.wait_for_device + own_timeout + MARGIN
    else:
        route = await route_of(redis, command.imei)
        if route is None:
            await publish_not_connected(redis, command, now_ms)
            expires, deadline = None, now + MARGIN
        else:
            settings = route.settings
            entries = await unsettled_commands(redis, route.instance)
            if any(fields.get("id") == command.id for fields in entries):
                _duplicate(command.id, f"a command with this id is on {route.instance}", outcome)
                return
            ahead = [
                timeout_of(fields, settings.command_timeout_s)
                for fields in entries
                if fields.get("imei") == command.imei
            ]
            own_timeout = (
                command.timeout_s if command.timeout_s is not None else settings.command_timeout_s
            )
            latest_write = now + write_window(ahead, settings)
            if args.no_expiry:
                expires = None
            elif args.expires is not None:
                expires = now + args.expires
            else:
                expires = latest_write
            deadline = (latest_write if expires is None else expires) + own_timeout + MARGIN
            command = attrs.evolve(
                command,
                created_at_ms=now_ms,
                expires_at_ms=None if expires is None else _ms(expires),
            )
            await publish_command(redis, route.instance, command)
    final = await wait_for_terminal(reader, command.id, after, deadline, reactor.seconds, progress)
    if final is None:
        print(_no_answer(command.id, seen, expires), file=sys.stderr)
        outcome["status"] = EXIT_NO_ANSWER
    elif final["status"] == FAILED:
        print(_failed(command.id, final.get("reason", ""), seen), file=sys.stderr)
        outcome["status"] = EXIT_FAILED
    else:
        print(final.get("response", ""))
        outcome["status"] = EXIT_OK


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _duplicate(command_id: str, where: str, outcome: dict[str, Any]) -> None:
    print(
        f"teltonika send: command id {command_id} is already in use ({where}); choose another --id",
        file=sys.stderr,
    )
    outcome["status"] = EXIT_USAGE


def _failed(command_id: str, reason: str, seen: list[str]) -> str:
    """The exit-1 message: the terminal status, its reason, what that means, and whether
    the device may have run the command."""
    from teltonika.commands.messages import NEVER_WRITTEN, REASON_MEANINGS

    head = f"failed: {reason or 'unknown'} (command {command_id}): "
    meaning = REASON_MEANINGS.get(reason, "the server gave no known reason")
    if reason in NEVER_WRITTEN or reason == "nack":
        return head + meaning
    if "delivered" in seen:
        return head + meaning + "; it was delivered, so the device may have run it"
    return head + meaning + "; no delivered status was seen, so it most likely did not run"


def _no_answer(command_id: str, seen: list[str], expires: float | None) -> str:
    """The exit-2 message: no terminal status in time, and whether the command can
    still run."""
    head = f"no answer for command {command_id} in time: "
    if "delivered" in seen:
        return head + (
            "it was delivered to the device, which may have run it; its reply or final "
            "status did not arrive"
        )
    if expires is None:
        return head + (
            "no server reported delivering it yet, and it has no expiry: it may still be "
            "delivered and run later"
        )
    return head + (
        f"no server reported delivering it, and none writes it after its expiry at "
        f"{_clock_time(expires)} (by the servers' clocks), which has passed: it will not run"
    )
