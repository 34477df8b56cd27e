"""Whether Redis gives the durability ``--redis-durability`` asked for, and keeps giving it.

Durability, stated plainly: an XADD reply means the entry is in Redis's *memory*. A Redis
crash then loses nothing acknowledged only when Redis runs with ``appendonly yes`` and
``appendfsync always`` (every write is fsynced before the reply), or when we wait for
``WAITAOF 1 0 0`` after the writes (Redis 7.2 and later; Debian 12 ships 7.0, so the
version is detected). Either way ``no-appendfsync-on-rewrite`` must be ``no``: with
``yes`` Redis skips the fsync while a rewrite child runs, even under ``appendfsync
always``.

Those are settings of a running server, and they can change under us: ``CONFIG SET``, a
Redis restarted with another configuration, a failover to a differently configured
server. So :class:`DurabilityCheck` is not only run at start: the Redis sink runs it
again on a timer and after every reconnect, and refuses frames while it fails.

A reconnect must be noticed *before* a batch written over the new connection is ACKed.
The check names the connection it verified (``CLIENT SETNAME``); a new connection has
no name, and every batch in an fsync mode ends with ``CLIENT GETNAME``. A batch whose
connection is not the verified one fails (no ACK, the devices resend) with
:class:`ConnectionChangedError`, and the sink checks again.

``replicated`` is ``fsync`` plus replicas: the same settings are required of the master,
and each batch also waits for ``--redis-replicas N`` replicas (``WAIT N timeout`` on
Redis before 7.2, where the master's ``appendfsync always`` gives the local fsync;
``WAITAOF 1 N timeout`` on 7.2+, where the replicas must run ``appendonly yes`` too).
Fewer confirmations fail the batch (:class:`ReplicasNotConfirmedError`): nothing in it is
ACKed and the devices resend. The check also requires the server to be a master with at
least N replicas connected, so a server short of replicas is refused (``/readyz`` 503)
rather than timing out batch after batch.

A new mode extends :class:`DurabilityCheck`: what to verify
(:meth:`DurabilityCheck.verify`), what each batch carries
(:meth:`DurabilityCheck.batch_commands`) and how its replies confirm it
(:meth:`DurabilityCheck.confirm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Final

from teltonika.redis.connection import RedisConnection
from teltonika.redis.streams import StreamWriteError, pipeline_commands

WAITAOF_MIN_VERSION: Final = (7, 2)

CONNECTION_NAME: Final = "teltonika-durability-checked"
"""The name a verified connection carries (``CLIENT LIST`` shows it too)."""

_WAITAOF: Final = (b"WAITAOF", b"1", b"0", b"0")
_GETNAME: Final = (b"CLIENT", b"GETNAME")


class Durability(Enum):
    """How a batch is confirmed before the server ACKs the devices."""

    MEMORY = "memory"
    """The XADD replies: entries are in Redis memory (lost if Redis crashes before its
    next AOF/RDB write)."""
    AOF_ALWAYS = "aof-always"
    """Redis fsyncs its AOF before every reply (``appendfsync always``)."""
    WAITAOF = "waitaof"
    """Each batch ends with ``WAITAOF 1 0 0``: the reply comes after the local fsync."""
    REPLICATED = "replicated"
    """``appendfsync always`` on the master, and each batch ends with ``WAIT N timeout``:
    N replicas hold the writes (in memory)."""
    REPLICATED_WAITAOF = "replicated-waitaof"
    """Each batch ends with ``WAITAOF 1 N timeout`` (Redis 7.2+): the master and N
    replicas fsynced the writes."""


DURABILITY_MODES: Final = ("memory", "fsync", "replicated")
"""What ``--redis-durability`` takes."""

DEFAULT_REPLICAS: Final = 1
DEFAULT_REPLICA_TIMEOUT: Final = 2.0
"""Seconds a batch waits for its replicas (``WAIT``'s timeout) before it fails."""


class DurabilityError(Exception):
    """Redis is not configured for the durability asked for; the message says what to do."""


class ReplicasNotConfirmedError(StreamWriteError):
    """Fewer replicas than ``--redis-replicas`` confirmed a batch within the timeout."""


class ConnectionChangedError(StreamWriteError):
    """A batch went over a connection the durability check has not verified (a reconnect,
    perhaps to another server): nothing in it may be ACKed."""


def parse_version(text: str) -> tuple[int, ...]:
    """``"7.0.15"`` -> ``(7, 0, 15)`` (non-numeric parts end the tuple)."""
    parts: list[int] = []
    for part in text.strip().split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def waitaof_ok(reply: object) -> bool:
    """True when a WAITAOF reply says the local AOF holds the writes (``[>=1, n]``)."""
    if not isinstance(reply, list | tuple) or len(reply) != 2:
        return False
    try:
        return int(reply[0]) >= 1
    except (TypeError, ValueError):
        return False


def replicas_confirmed(reply: object, durability: Durability) -> int:
    """How many replicas a ``WAIT`` (an integer) or ``WAITAOF`` (``[local, replicas]``,
    counted only when the local fsync is confirmed) reply confirms; 0 for anything else."""
    try:
        if durability is Durability.REPLICATED_WAITAOF:
            if not waitaof_ok(reply):
                return 0
            assert isinstance(reply, list | tuple)
            return int(reply[1])
        if isinstance(reply, bool) or not isinstance(reply, int | str | bytes):
            return 0
        return int(reply)
    except (TypeError, ValueError):
        return 0


def _config_value(reply: object, name: str) -> str:
    """The value from a ``CONFIG GET name`` reply (a flat list, or a dict on RESP3)."""
    if isinstance(reply, dict):
        value = reply.get(name)
    elif isinstance(reply, list | tuple) and len(reply) >= 2:
        value = reply[1]
    else:
        value = None
    if isinstance(value, bytes):
        value = value.decode()
    if not isinstance(value, str):
        raise DurabilityError(f"Redis gave no value for CONFIG GET {name} (got {reply!r})")
    return value


def _info_field(info: object, name: str) -> str:
    if isinstance(info, bytes):
        info = info.decode()
    if isinstance(info, str):
        for line in info.splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
    return ""


def _online_replicas(info: object) -> int:
    """Replicas in ``INFO replication`` whose state is ``online`` (one still loading its
    first copy is connected, but cannot acknowledge a WAIT yet)."""
    if isinstance(info, bytes):
        info = info.decode()
    if not isinstance(info, str):
        return 0
    return sum(
        1
        for line in info.splitlines()
        if line.startswith("slave") and ":" in line and "state=online" in line.split(":", 1)[1]
    )


def _text(reply: object) -> str | None:
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    return reply if isinstance(reply, str) else None


class DurabilityCheck:
    """Verifies that Redis gives the durability *wanted*, and confirms each batch.

    :param wanted: ``"memory"``, ``"fsync"`` or ``"replicated"`` (``--redis-durability``).
    :param replicas: with ``replicated``, how many replicas must confirm each batch.
    :param replica_timeout: with ``replicated``, seconds a batch waits for them.
    """

    def __init__(
        self,
        wanted: str,
        replicas: int = DEFAULT_REPLICAS,
        replica_timeout: float = DEFAULT_REPLICA_TIMEOUT,
    ) -> None:
        if wanted not in DURABILITY_MODES:
            raise DurabilityError(
                f"unknown durability {wanted!r}: use {', '.join(DURABILITY_MODES)}"
            )
        if wanted == "replicated" and replicas < 1:
            raise DurabilityError("--redis-durability replicated needs --redis-replicas >= 1")
        if wanted == "replicated" and not replica_timeout > 0:
            raise DurabilityError("the replica timeout must be above 0 (WAIT 0 never ends)")
        self.wanted = wanted
        self.replicas = replicas
        self.replica_timeout = replica_timeout
        timeout_ms = str(max(1, round(replica_timeout * 1000))).encode()
        count = str(replicas).encode()
        self._wait = (b"WAIT", count, timeout_ms)
        self._waitaof = (b"WAITAOF", b"1", count, timeout_ms)

    @property
    def rechecked(self) -> bool:
        """True when the settings can drift and must be verified again and again."""
        return self.wanted != "memory"

    async def verify(
        self, redis: RedisConnection, others: Sequence[RedisConnection] = ()
    ) -> Durability:
        """Ask Redis for its settings (one round trip) and name the connection verified
        (and the *others*, further connections to the same server that batches use).

        :return: how batches are to be confirmed.
        :raise DurabilityError: the settings do not give what was asked; the message
            names the settings to change.
        :raise Exception: Redis could not be asked (a lost connection, a timeout).
        """
        if not self.rechecked:
            await redis.execute_command("PING")
            return Durability.MEMORY
        commands = [
            (b"CLIENT", b"SETNAME", CONNECTION_NAME.encode()),
            (b"CONFIG", b"GET", b"appendonly"),
            (b"CONFIG", b"GET", b"appendfsync"),
            (b"CONFIG", b"GET", b"no-appendfsync-on-rewrite"),
            (b"INFO", b"server"),
            (b"INFO", b"replication"),
        ]
        from txredisapi import ResponseError

        try:
            (
                _named,
                appendonly,
                appendfsync,
                on_rewrite,
                info,
                replication,
            ) = await pipeline_commands(redis, commands)
            for other in others:
                await other.execute_command(b"CLIENT", b"SETNAME", CONNECTION_NAME.encode())
        except ResponseError as error:
            raise DurabilityError(
                f"--redis-durability {self.wanted} needs CONFIG GET, INFO and CLIENT SETNAME "
                f"to verify the Redis settings, and Redis refused: {error}"
            ) from None
        durability = self._judge(
            _config_value(appendonly, "appendonly"),
            _config_value(appendfsync, "appendfsync"),
            _config_value(on_rewrite, "no-appendfsync-on-rewrite"),
            _info_field(info, "redis_version"),
        )
        if self.wanted != "replicated":
            return durability
        self._judge_replication(_info_field(replication, "role"), _online_replicas(replication))
        if durability is Durability.WAITAOF:
            return Durability.REPLICATED_WAITAOF
        return Durability.REPLICATED

    def _judge_replication(self, role: str, online: int) -> None:
        if role != "master":
            raise DurabilityError(
                f"--redis-durability replicated: Redis is a {role or 'server of unknown role'}, "
                "not a master"
            )
        if online < self.replicas:
            raise DurabilityError(
                f"--redis-durability replicated: the master has {online} replica(s) online "
                f"and --redis-replicas asks for {self.replicas}; frames are refused until "
                "enough replicas are connected"
            )

    def _judge(
        self, appendonly: str, appendfsync: str, on_rewrite: str, version_text: str
    ) -> Durability:
        version = parse_version(version_text)
        described = (
            f"Redis {version_text or '(unknown version)'} runs with appendonly={appendonly} "
            f"appendfsync={appendfsync} no-appendfsync-on-rewrite={on_rewrite}"
        )
        mode = f"--redis-durability {self.wanted}"
        if appendonly == "yes" and on_rewrite == "yes":
            raise DurabilityError(
                f"{mode}: {described}. With no-appendfsync-on-rewrite yes "
                "Redis skips the fsync while it rewrites the AOF (even with appendfsync "
                "always), so an ACKed frame could be lost: configure "
                "'no-appendfsync-on-rewrite no', or start with --redis-durability memory."
            )
        if appendonly == "yes" and appendfsync == "always":
            return Durability.AOF_ALWAYS
        if appendonly == "yes" and version >= WAITAOF_MIN_VERSION:
            return Durability.WAITAOF
        raise DurabilityError(
            f"{mode}: {described}. Configure 'appendonly yes' and "
            "'appendfsync always' (or 'appendonly yes' on Redis 7.2+ for WAITAOF), or start "
            "with --redis-durability memory."
        )

    def batch_commands(self, durability: Durability) -> list[Sequence[bytes]]:
        """Commands that end every batch written under *durability*."""
        if durability is Durability.MEMORY:
            return []
        if durability is Durability.WAITAOF:
            return [_WAITAOF, _GETNAME]
        if durability is Durability.REPLICATED:
            return [self._wait, _GETNAME]
        if durability is Durability.REPLICATED_WAITAOF:
            return [self._waitaof, _GETNAME]
        return [_GETNAME]

    def confirm(self, durability: Durability, replies: Sequence[object]) -> None:
        """Check the replies to :meth:`batch_commands` (in order).

        :raise ConnectionChangedError: the batch went over a connection not verified.
        :raise ReplicasNotConfirmedError: fewer replicas than asked confirmed in time.
        :raise StreamWriteError: Redis did not confirm the fsync.
        """
        if durability is Durability.MEMORY:
            return
        if durability is Durability.WAITAOF and not waitaof_ok(replies[0]):
            raise StreamWriteError(f"WAITAOF did not confirm the local fsync: {replies[0]!r}")
        if durability in (Durability.REPLICATED, Durability.REPLICATED_WAITAOF):
            confirmed = replicas_confirmed(replies[0], durability)
            if confirmed < self.replicas:
                raise ReplicasNotConfirmedError(
                    f"{confirmed} of {self.replicas} replica(s) confirmed the batch within "
                    f"{self.replica_timeout:g} s (reply {replies[0]!r})"
                )
        name = _text(replies[-1])
        if name != CONNECTION_NAME:
            raise ConnectionChangedError(
                f"the batch went over a Redis connection whose durability was not checked "
                f"(client name {name!r}): a reconnect"
            )


async def check_durability(
    redis: RedisConnection, wanted: str, replicas: int = DEFAULT_REPLICAS
) -> Durability:
    """Check once that Redis can give the durability *wanted* (``memory``, ``fsync`` or
    ``replicated``).

    :raise DurabilityError: with a message naming the Redis settings to change.
    """
    return await DurabilityCheck(wanted, replicas).verify(redis)
