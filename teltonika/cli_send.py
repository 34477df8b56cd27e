"""``teltonika send``: one command to one tracker through Redis, and its answer.

    teltonika send --redis redis://host:6379/0 352093081452251 'getinfo'
    teltonika send --redis URL IMEI 'getver' --codec 14 --timeout 20
    teltonika send --redis URL IMEI 'setdigout 1' --wait-for-device 3600

It looks the device up in ``connections:registry``, publishes the command to the stream
of the instance holding its socket, waits on ``commands:responses`` for the command's
terminal status, prints the reply text and exits 0. A failure prints ``failed: REASON``
to stderr and exits 1; no answer in time exits 2; bad arguments or an unreachable Redis
exit 3. With ``--wait-for-device S`` the command is kept (in Redis) for the device's next
login for at most S seconds, and ``send`` waits that long plus the reply timeout.
There is no HTTP anywhere: Redis is the only way in (seed 001, invariant 1).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Final

from teltonika.commands.messages import FAILED, Command

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_NO_ANSWER: Final = 2
EXIT_USAGE: Final = 3
CONNECT_TIMEOUT: Final = 5.0
MARGIN: Final = 5.0
"""Seconds ``send`` waits beyond the command's own deadline (routing and Redis time)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("imei", help="the tracker's IMEI (15 digits)")
    parser.add_argument("command", help="the command text, e.g. getinfo, 'setdigout 1'")
    parser.add_argument("--redis", required=True, metavar="URL", help="redis://host:port/db")
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

    def main(reactor: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(_send(reactor, address, command, args, outcome))

    try:
        task.react(main)
    except SystemExit as done:
        if done.code not in (0, None):
            return EXIT_USAGE
    status: int = outcome["status"]
    return status


async def _send(
    reactor: Any, address: Any, command: Command, args: argparse.Namespace, outcome: dict[str, Any]
) -> None:
    import attrs
    from twisted.internet.defer import maybeDeferred

    from teltonika.commands.client import (
        last_response_id,
        send_command,
        store_offline,
        wait_for_terminal,
    )
    from teltonika.redis.connect import lazy_connection

    redis = lazy_connection(address, connect_timeout=5.0)
    reader = lazy_connection(address, connect_timeout=5.0)

    def progress(fields: dict[str, str]) -> None:
        if not args.quiet and fields.get("status") not in ("responded", "failed"):
            print(f"{fields.get('status')} ({fields.get('instance_id')})", file=sys.stderr)

    try:
        now = reactor.seconds()
        try:
            # txredisapi waits for a connection forever: bound the first contact.
            try:
                for conn in (redis, reader):
                    await maybeDeferred(conn.ping).addTimeout(CONNECT_TIMEOUT, reactor)
            except TimeoutError:
                print(
                    f"teltonika send: Redis at {address} did not answer within "
                    f"{CONNECT_TIMEOUT:g} s",
                    file=sys.stderr,
                )
                outcome["status"] = EXIT_USAGE
                return
            after = await last_response_id(redis)
            command_timeout = command.timeout_s if command.timeout_s is not None else 30.0
            if args.wait_for_device is not None:
                expires = int((now + args.wait_for_device) * 1000)
                command = attrs.evolve(
                    command, offline=True, expires_at_ms=expires, created_at_ms=int(now * 1000)
                )
                await store_offline(redis, command, int(now * 1000))
                deadline = now + args.wait_for_device + command_timeout + MARGIN
            else:
                command = attrs.evolve(command, created_at_ms=int(now * 1000))
                await send_command(redis, command, int(now * 1000))
                deadline = now + command_timeout + MARGIN
            final = await wait_for_terminal(
                reader, command.id, after, deadline, reactor.seconds, progress
            )
        except Exception as error:
            print(f"teltonika send: Redis error: {error!r}", file=sys.stderr)
            outcome["status"] = EXIT_USAGE
            return
        if final is None:
            print(f"no answer for command {command.id} in time", file=sys.stderr)
            outcome["status"] = EXIT_NO_ANSWER
        elif final["status"] == FAILED:
            print(f"failed: {final.get('reason', '')} (command {command.id})", file=sys.stderr)
            outcome["status"] = EXIT_FAILED
        else:
            print(final.get("response", ""))
            outcome["status"] = EXIT_OK
    finally:
        for conn in (redis, reader):
            with contextlib.suppress(Exception):  # closing at exit: nothing to recover
                await conn.disconnect()
