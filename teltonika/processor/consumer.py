"""The read / write / acknowledge loop: stream entries into ``positions``, exactly once.

Invariants (README.rst, "Exactly once, and what that means"):

* an entry is XACKed only after the transaction holding its row committed (or after it
  went to the dead-letter stream); a batch that fails stays pending;
* at most three batches are in memory (one read ahead, one being written, one being
  acknowledged): while PostgreSQL is down the same batch is retried with backoff and
  nothing more is read (memory stays flat); every entry this consumer holds (the read-ahead
  batch too) is kept "fresh" with ``XCLAIM ... JUSTID`` by a timer (every
  ``refresh_interval``, at most half of ``claim_idle``), so another processor does not
  claim it meanwhile, and an entry a peer already claimed is never taken back;
* on start a consumer first re-reads its own pending entries (a crash between COMMIT and
  XACK then gives duplicates, which ``ON CONFLICT DO NOTHING`` absorbs), then new ones;
* entries idle in another consumer longer than ``claim_idle`` are taken over with
  XAUTOCLAIM; an entry delivered more than ``max_deliveries`` times is still written like
  any other (it may have come back only because PostgreSQL was down), but when its batch
  fails for a reason other than PostgreSQL being unavailable it is written alone, and
  dead-lettered (reason ``max_deliveries``) if that fails too;
* PostgreSQL errors are retried (after a timeout, in smaller transactions); any other
  exception while writing is a bug and a crash (below), never retried as an outage;
* every entry ends as one row or one dead letter: an entry that fails the contract, whose
  check fails in any other way, or whose row PostgreSQL rejects, is dead-lettered, logged
  at error level and counted, then XACKed (never skipped silently), and the rest of its
  batch is written;
* anything else that escapes the loop is a crash: logged as critical, the consumer is
  never ready again, and :class:`teltonika.processor.service.ProcessorService` makes the
  process exit non-zero so that its supervisor restarts it (no zombie that answers
  ``/readyz`` 200 and reads nothing).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import psycopg
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika.processor.database import Database, error_kind, is_unavailable
from teltonika.processor.defaults import BATCH_SIZE
from teltonika.processor.entries import (
    MAX_FIELDS,
    ContractError,
    Position,
    fields_dict,
    parse_fields,
)
from teltonika.processor.metrics import ProcessorMetrics
from teltonika.processor.migrations import SchemaError
from teltonika.processor.state import DeviceState
from teltonika.processor.streams import DeadLetter, Streams
from teltonika.processor.writer import WriteOutcome, write_batch
from teltonika.redis.groups import Entry, GroupReply, classify


class _Timeout(Exception):
    """A write timed out: :meth:`Consumer._write` retries it in smaller transactions."""


@attrs.define
class Batch:
    """A batch read and checked, not yet written: what :meth:`Consumer.commit` needs."""

    entries: Sequence[Entry]
    redelivered: bool
    started: float
    positions: list[Position] = attrs.field(factory=list)
    dead: list[DeadLetter] = attrs.field(factory=list)
    payload: bytes | None = None
    """The COPY data of ``positions`` (built while the previous batch is written)."""
    suspects: dict[str, int] = attrs.field(factory=dict)
    """Entry id -> delivery count of the entries delivered more than ``max_deliveries``
    times: written alone if the batch fails (:meth:`Consumer._write_isolating`)."""


@attrs.frozen
class ConsumerConfig:
    """Tuning of the loop; the defaults are the command-line defaults."""

    batch_size: int = BATCH_SIZE
    block_ms: int = 2000
    claim_idle: float = 60.0
    claim_interval: float = 10.0
    max_deliveries: int = 5
    refresh_interval: float = 5.0
    """Seconds between two refreshes of every held entry (at most half of ``claim_idle``:
    :class:`teltonika.processor.tap.Options` checks it)."""
    retry_initial: float = 0.25
    retry_max: float = 5.0
    group_start: str = "0"


class Consumer:
    """One consumer of the group: see the module docstring.

    :param migrate: run before reading (``fn(connection) -> list of applied names``), or
        None; a :class:`~teltonika.processor.migrations.SchemaError` from it refuses the
        start (the process exits non-zero), any other failure is retried.
    """

    _log = Logger()

    def __init__(
        self,
        streams: Streams,
        database: Database,
        state: DeviceState,
        metrics: ProcessorMetrics,
        clock: IReactorTime,
        config: ConsumerConfig = ConsumerConfig(),
        migrate: Callable[[psycopg.Connection[Any]], list[str]] | None = None,
    ) -> None:
        self.streams = streams
        self.database = database
        self.state = state
        self.metrics = metrics
        self.clock = clock
        self.config = config
        self.migrate = migrate
        self.redis_ok = False
        self.postgres_ok = False
        self.joined = False
        self.stopping = False
        self.crashed: Failure | None = None
        """Why the loop ended unexpectedly (or refused to start), once it has."""
        self.batches = 0
        self._done: Deferred[None] | None = None
        self._sleeping: set[Deferred[None]] = set()
        self._held: set[str] = set()
        """Ids of the entries read and not yet acknowledged or abandoned (every batch in
        memory): what :meth:`_refresh_held` keeps from being claimed."""
        self._refresher: LoopingCall | None = None
        self._refreshing = False

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> Deferred[None]:
        """Start the loop; the Deferred fires when it has ended: after :meth:`stop`, or
        after a crash (then :attr:`crashed` says why). It never fails."""
        self._done = Deferred.fromCoroutine(self._main())
        return self._done

    def ready(self) -> bool:
        """Joined the group, both stores reachable, not shutting down, not crashed."""
        return (
            self.joined
            and self.redis_ok
            and self.postgres_ok
            and not self.stopping
            and self.crashed is None
        )

    def stop(self) -> Deferred[None]:
        """Stop reading; the Deferred fires once the batch in flight is committed and
        acknowledged (or abandoned, still pending, when a store is down)."""
        self._halt()
        if self._done is None or self._done.called:
            return succeed(None)
        d: Deferred[None] = Deferred()

        def ended(result: object) -> object:
            d.callback(None)
            return result

        self._done.addBoth(ended)
        return d

    def _halt(self) -> None:
        """Stop at the next step and wake every coroutine sleeping before a retry."""
        self.stopping = True
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        for sleeping in list(self._sleeping):
            sleeping.cancel()

    def _crash(self, failure: Failure) -> None:
        """An exception nothing expected ended the loop or a batch: never ready again,
        stop; the service then makes the process exit non-zero."""
        if self.crashed is None:
            self.crashed = failure
            self._log.failure(
                "The processor loop crashed: not ready from now on; stopping so that the "
                "process exits non-zero and its supervisor restarts it",
                failure,
            )
        self._halt()

    async def _sleep(self, seconds: float) -> None:
        if self.stopping:
            return
        sleeping = deferLater(self.clock, seconds, lambda: None)
        self._sleeping.add(sleeping)
        try:
            await sleeping
        except CancelledError:
            pass
        finally:
            self._sleeping.discard(sleeping)

    # -- start-up ----------------------------------------------------------------------
    async def _main(self) -> None:
        try:
            if not await self._start_up():
                return
            self._start_refresher()
            await self._loop()
        except Exception:
            self._crash(Failure())
            return
        if self.crashed is None:
            self._log.info("Consumer {consumer} stopped reading", consumer=self.streams.consumer)

    async def _retrying(self, what: str, step: Callable[[], Awaitable[None]]) -> bool:
        """Run ``await step()`` until it succeeds (True) or we are stopping (False); a
        :class:`SchemaError` is not retried (it propagates)."""
        delay = self.config.retry_initial
        failures = 0
        while not self.stopping:
            try:
                await step()
                return True
            except SchemaError:
                raise
            except Exception as e:
                failures += 1
                emit = self._log.error if failures == 1 else self._log.warn
                emit(
                    "{what} failed (attempt {attempt}), retrying: {error}",
                    what=what,
                    attempt=failures,
                    error=repr(e),
                )
                await self._sleep(delay)
                delay = min(delay * 2, self.config.retry_max)
        return False

    async def _start_up(self) -> bool:
        streams = self.streams

        async def postgres() -> None:
            version = await self.database.run(
                lambda c: c.execute("SHOW server_version").fetchone()[0]
            )
            self.postgres_ok = True
            self._log.info("PostgreSQL connected (server {version})", version=version)
            if self.migrate is not None:
                applied = await self.database.run(self.migrate)
                if applied:
                    self._log.info("Migrations applied: {applied}", applied=", ".join(applied))
                else:
                    self._log.info("Migrations: schema up to date")

        async def redis() -> None:
            await streams.ping()
            self.redis_ok = True
            self._log.info("Redis connected")
            created = await streams.create_group(self.config.group_start)
            self.joined = True
            self._log.info(
                "Consumer {consumer} joined group {group} on {stream}{created}",
                consumer=streams.consumer,
                group=streams.group,
                stream=streams.stream,
                created=" (group created)" if created else "",
            )

        try:
            if not await self._retrying("Connecting to PostgreSQL", postgres):
                return False
        except SchemaError as e:
            self._log.critical("Refusing to start: {error}", error=str(e))
            self.crashed = Failure()
            self._halt()
            return False
        if not await self._retrying("Connecting to Redis", redis):
            return False
        self._log.info(
            "Processor ready: batch {batch_size}, claim idle {claim_idle}s, "
            "max deliveries {max_deliveries}",
            batch_size=self.config.batch_size,
            claim_idle=self.config.claim_idle,
            max_deliveries=self.config.max_deliveries,
        )
        return True

    # -- the loop ------------------------------------------------------------------------
    async def _loop(self) -> None:
        """Own pending entries first (one batch at a time), then new ones, pipelined:
        batch N+1 is read and checked while batch N is being written, and written while
        batch N is being acknowledged. At most three batches are held (one read ahead,
        one on the database, one waiting for its XACK), and only one is ever on the
        database: while PostgreSQL is down, nothing new is written or read.

        Only Redis calls are guarded here: anything else that raises is a crash."""
        config = self.config
        cursor = "0"
        next_claim = 0.0
        delay = config.retry_initial
        in_flight: list[tuple[Deferred[None], Deferred[bool]]] = []  # (written, done)
        while not self.stopping:
            if cursor == ">" and self.clock.seconds() >= next_claim:
                await self._drain(in_flight)
                next_claim = self.clock.seconds() + config.claim_interval
                await self._claim_idle()
                continue
            block = config.block_ms if cursor == ">" else None
            try:
                entries = await self.streams.read(cursor, config.batch_size, block)
            except Exception as e:
                if classify(e) in (GroupReply.NO_GROUP, GroupReply.UNBLOCKED):
                    await self._recreate_group()
                    cursor = "0"
                    continue
                self._redis_failed("Reading the stream", e)
                await self._sleep(delay)
                delay = min(delay * 2, config.retry_max)
                continue
            delay = config.retry_initial
            if not self.redis_ok:
                self._log.info("Redis is reachable again")
            self.redis_ok = True
            if cursor != ">":
                if not entries:
                    cursor = ">"
                    continue
                cursor = entries[-1].entry_id
                await self.process(entries, redelivered=True)
            elif entries:
                batch = await self.prepare(entries, redelivered=False)
                if in_flight:
                    await in_flight[-1][0]  # the previous batch is written (not yet acked)
                while len(in_flight) >= 2 or (in_flight and in_flight[0][1].called):
                    await in_flight.pop(0)[1]  # at most one batch waiting for its XACK
                written: Deferred[None] = Deferred()
                done = Deferred.fromCoroutine(self.commit(batch, written))
                done.addErrback(self._crash)
                in_flight.append((written, done))
        await self._drain(in_flight)

    @staticmethod
    async def _drain(in_flight: list[tuple[Deferred[None], Deferred[bool]]]) -> None:
        """Wait until every batch in flight is written and acknowledged (or abandoned)."""
        while in_flight:
            await in_flight.pop(0)[1]

    async def _recreate_group(self) -> None:
        """The stream or our group was deleted under us (FLUSHALL, DEL, XGROUP DESTROY):
        create it again rather than fail every read until someone restarts us."""
        streams = self.streams
        try:
            await streams.create_group(self.config.group_start)
        except Exception as e:
            self._redis_failed("Recreating the consumer group", e)
            await self._sleep(self.config.retry_initial)
            return
        self._log.warn(
            "Group {group} on {stream} had vanished; created it again (from {start})",
            group=streams.group,
            stream=streams.stream,
            start=self.config.group_start,
        )

    def _redis_failed(self, what: str, error: Exception) -> None:
        self.metrics.redis_errors.inc()
        if self.redis_ok:
            self._log.error(
                "{what} failed, Redis unreachable: {error}", what=what, error=repr(error)
            )
        else:
            self._log.warn("{what} failed again: {error}", what=what, error=repr(error))
        self.redis_ok = False

    async def _claim_idle(self) -> None:
        """Take over entries idle longer than ``claim_idle`` in any consumer."""
        start = "0-0"
        min_idle_ms = int(self.config.claim_idle * 1000)
        while not self.stopping:
            try:
                start, entries, deleted = await self.streams.autoclaim(
                    min_idle_ms, start, self.config.batch_size
                )
            except Exception as e:
                self._redis_failed("Claiming idle entries", e)
                return  # tried again at the next claim interval
            if deleted:
                self._deleted(deleted)
            if entries:
                self.metrics.entries_claimed.inc(len(entries))
                self._log.info(
                    "Claimed {count} entries idle for more than {idle}s",
                    count=len(entries),
                    idle=self.config.claim_idle,
                )
                await self.process(entries, redelivered=True)
            if start == "0-0":
                return

    def _deleted(self, ids: Sequence[str]) -> None:
        """Pending entries whose content is gone: it was deleted or trimmed from the stream
        before it was stored, which is a loss (``--stream-maxlen`` too small, a manual
        XDEL or XTRIM). They are acknowledged; there is nothing left to store."""
        self.metrics.entries_deleted.inc(len(ids))
        self._log.error(
            "{count} pending entries were deleted from the stream before they were stored "
            "(trimmed or deleted upstream): {ids}",
            count=len(ids),
            ids=", ".join(ids[:20]) + (" ..." if len(ids) > 20 else ""),
        )

    # -- one batch -------------------------------------------------------------------------
    async def process(self, entries: Sequence[Entry], redelivered: bool) -> bool:
        """Write one batch and acknowledge it; False when abandoned (stays pending)."""
        return await self.commit(await self.prepare(entries, redelivered))

    async def prepare(self, entries: Sequence[Entry], redelivered: bool) -> Batch:
        """Check a batch against the contract (and the delivery limit); no database work.

        Every entry ends in :attr:`Batch.positions` or :attr:`Batch.dead`, whatever its
        fields hold: one entry's failure never takes its neighbours with it."""
        metrics = self.metrics
        batch = Batch(entries=entries, redelivered=redelivered, started=self.clock.seconds())
        metrics.entries_read.inc(len(entries))
        metrics.batch_size.observe(len(entries))
        self._held.update(entry.entry_id for entry in entries)
        live = [e for e in entries if e.fields is not None]
        if len(live) != len(entries):
            self._deleted([e.entry_id for e in entries if e.fields is None])
        if redelivered and live:
            await self._over_delivered(live, batch.suspects)
        positions = batch.positions
        lines = []
        for entry in live:
            fields = entry.fields or []
            try:
                position = parse_fields(entry.entry_id, fields)
                line = position.copy_line()
            except ContractError as e:
                batch.dead.append(DeadLetter(entry.entry_id, fields, e.reason, e.detail))
                continue
            except Exception as e:
                self._log.failure(
                    "Checking entry {entry_id} failed unexpectedly; dead-lettering it",
                    entry_id=entry.entry_id,
                )
                detail = f"{type(e).__name__}: {e}"[:500]
                batch.dead.append(DeadLetter(entry.entry_id, fields, "check_failed", detail))
                continue
            positions.append(position)
            lines.append(line)
        if positions:
            batch.payload = self._payload(batch, lines)
        return batch

    def _payload(self, batch: Batch, lines: list[str]) -> bytes:
        """The COPY data of the batch's positions; a line that cannot be encoded (which the
        checks should make impossible) is dead-lettered alone rather than failing all."""
        try:
            return ("\n".join(lines) + "\n").encode("utf-8")
        except UnicodeEncodeError:
            pass
        kept: list[Position] = []
        encoded: list[bytes] = []
        fields_of = {e.entry_id: e.fields or [] for e in batch.entries}
        for position, line in zip(batch.positions, lines, strict=True):
            try:
                encoded.append(line.encode("utf-8") + b"\n")
            except UnicodeEncodeError as e:
                fields = fields_of[position.entry_id]
                batch.dead.append(DeadLetter(position.entry_id, fields, "bad_field", str(e)))
                continue
            kept.append(position)
        batch.positions = kept
        return b"".join(encoded)

    async def commit(self, batch: Batch, written: Deferred[None] | None = None) -> bool:
        """Rehydrate + write + dead-letter + XACK one prepared batch; False when abandoned.

        :param written: fired once the database part is over (committed and the device
            state updated, or abandoned), so the next batch's write, which decides which
            devices it must rehydrate, can start while this one is being acknowledged.
        """
        metrics = self.metrics
        positions = batch.positions
        dead = batch.dead
        ack_ids = [e.entry_id for e in batch.entries]
        try:
            missing = self.state.missing([p.device_id for p in positions])
            outcome = await self._write(batch, missing)
            positions = batch.positions  # less any poison entry written alone
            if outcome is not None:
                if outcome.rejected:
                    fields_of = {e.entry_id: e.fields or [] for e in batch.entries}
                    for position, why in outcome.rejected:
                        dead.append(
                            DeadLetter(
                                position.entry_id,
                                fields_of[position.entry_id],
                                "rejected_by_database",
                                why,
                            )
                        )
                if missing:
                    metrics.rehydration_queries.inc()
                self._update_state(positions, outcome)
        finally:
            if written is not None:
                written.callback(None)
        if outcome is None:
            self._held.difference_update(ack_ids)
            return False
        metrics.rows_inserted.inc(outcome.inserted)
        metrics.duplicates.inc(outcome.duplicates)
        for letter in dead:
            metrics.dead_lettered.labels(reason=letter.reason).inc()
            self._log.error(
                "Dead-lettered entry {entry_id}: {reason} ({detail})",
                entry_id=letter.entry_id,
                reason=letter.reason,
                detail=letter.detail,
                imei=fields_dict(letter.fields[: 2 * MAX_FIELDS]).get("imei"),
            )
        acknowledged = await self._acknowledge(dead, ack_ids)
        self._held.difference_update(ack_ids)
        if not acknowledged:
            return False
        self.batches += 1
        metrics.acked.inc(len(ack_ids))
        metrics.devices.set(len(self.state))
        seconds = self.clock.seconds() - batch.started
        metrics.batch_seconds.observe(seconds)
        self._log.debug(
            "Batch written: {count} entries, inserted={inserted} duplicates={duplicates} "
            "dead={dead} redelivered={redelivered} in {seconds:.4f}s (database {db_seconds:.4f}s)",
            count=len(batch.entries),
            inserted=outcome.inserted,
            duplicates=outcome.duplicates,
            dead=len(dead),
            redelivered=batch.redelivered,
            seconds=seconds,
            db_seconds=outcome.seconds,
        )
        return True

    async def _over_delivered(self, live: list[Entry], suspects: dict[str, int]) -> None:
        """Note in *suspects* the entries delivered more than ``max_deliveries`` times.

        They are not dead-lettered for that alone: an entry redelivered because
        PostgreSQL was down (a restart, a peer's claim) is as good as any other. Only one
        that cannot be written is a poison entry (:meth:`_write_isolating`)."""
        limit = self.config.max_deliveries
        try:
            counts = await self.streams.deliveries(
                live[0].entry_id, live[-1].entry_id, max(len(live), self.config.batch_size) * 2
            )
        except Exception as e:
            self._redis_failed("Reading delivery counts", e)
            return  # checked again on the next delivery
        for entry in live:
            count = counts.get(entry.entry_id, 0)
            if count > limit:
                suspects[entry.entry_id] = count

    async def _write(self, batch: Batch, missing: list[str]) -> WriteOutcome | None:
        """Write *batch* until it works; None when stopping with PostgreSQL still failing.

        Errors are told apart (README.rst, "Exactly once, and what that means"):

        * PostgreSQL errors are retried with backoff, nothing acknowledged meanwhile; a
          statement or lock timeout too (a database that stalls must not look ready), and
          after one the batch is written in smaller transactions
          (:func:`~teltonika.processor.writer.write_batch`'s *chunk*), halved at each
          timeout, so one batch too large for ``--statement-timeout`` cannot time out for
          ever;
        * any other exception is a bug: it propagates and the loop crashes (critical,
          ``/readyz`` 503, exit 70) rather than being retried as if the database were down;
        * except when the batch holds entries delivered more than ``max_deliveries`` times
          (:attr:`Batch.suspects`) and the error is not PostgreSQL being unavailable: then
          those are written alone and the ones that still fail are dead-lettered
          (:meth:`_write_isolating`).
        """
        try:
            return await self._write_rows(
                batch.positions, missing, batch.payload, strict=bool(batch.suspects)
            )
        except Exception as e:
            if batch.suspects and not is_unavailable(e):
                self._log.warn(
                    "A batch holding {count} entries delivered more than {limit} times "
                    "failed ({error}): writing those alone",
                    count=len(batch.suspects),
                    limit=self.config.max_deliveries,
                    error=f"{type(e).__name__}: {e}".strip()[:200],
                )
                return await self._write_isolating(batch, missing)
            raise

    async def _write_rows(
        self,
        positions: list[Position],
        missing: list[str],
        payload: bytes | None,
        *,
        strict: bool = False,
    ) -> WriteOutcome | None:
        """:meth:`_attempts` in transactions of at most *chunk* rows, halved after each
        timeout (down to one row)."""
        chunk = max(1, len(positions))
        while True:
            try:
                return await self._attempts(positions, missing, payload, chunk, strict=strict)
            except _Timeout:
                chunk = max(1, chunk // 2)
                payload = None  # in chunks: each builds its own COPY data
                self._log.warn(
                    "A write timed out: writing the batch in transactions of at most {chunk} rows",
                    chunk=chunk,
                )

    async def _write_isolating(self, batch: Batch, missing: list[str]) -> WriteOutcome | None:
        """Write the rest of the batch, then each suspect entry alone. A suspect whose own
        write fails for any reason but PostgreSQL being unavailable is a poison entry:
        dead-lettered with reason ``max_deliveries`` (the error in its detail)."""
        suspects = batch.suspects
        limit = self.config.max_deliveries
        rest = [p for p in batch.positions if p.entry_id not in suspects]
        # the others first, retried as any batch: a PostgreSQL that refuses everything
        # keeps them pending here rather than reaching the suspects' verdict
        total = await self._write_rows(rest, missing, None)
        if total is None:
            return None
        poisoned: set[str] = set()
        fields_of = {e.entry_id: e.fields or [] for e in batch.entries}
        for position in batch.positions:
            if position.entry_id not in suspects:
                continue
            try:
                outcome = await self._attempts([position], [], None, 1, strict=True)
            except Exception as e:
                poisoned.add(position.entry_id)
                batch.dead.append(
                    DeadLetter(
                        position.entry_id,
                        fields_of[position.entry_id],
                        "max_deliveries",
                        f"delivered {suspects[position.entry_id]} times (limit {limit}); "
                        f"written alone it failed: {type(e).__name__}: {e}".strip()[:500],
                    )
                )
                continue
            if outcome is None:
                return None
            total.merge(outcome)
        batch.positions = [p for p in batch.positions if p.entry_id not in poisoned]
        return total

    async def _attempts(
        self,
        positions: list[Position],
        missing: list[str],
        payload: bytes | None,
        chunk: int,
        *,
        strict: bool = False,
    ) -> WriteOutcome | None:
        """One write retried while PostgreSQL fails; None when stopping first.

        :raise _Timeout: a statement or lock timeout, for :meth:`_write` to split the
            batch (only when it is larger than one row).
        :raise Exception: anything that is not a PostgreSQL error; with *strict*, also a
            PostgreSQL error other than unavailability.
        """
        delay = self.config.retry_initial
        attempt = 0
        while True:
            attempt += 1
            try:
                outcome = await self.database.run(write_batch, positions, missing, payload, chunk)
            except psycopg.Error as e:
                kind = error_kind(e)
                self.metrics.postgres_errors.labels(kind=kind).inc()
                if strict and not is_unavailable(e):
                    raise
                if self.postgres_ok:
                    self._log.error(
                        "PostgreSQL write failed ({kind}); holding {count} entries "
                        "unacknowledged and retrying: {error}",
                        kind=kind,
                        count=len(self._held),
                        error=str(e).strip(),
                    )
                else:
                    self._log.warn(
                        "PostgreSQL write failed again (attempt {attempt}): {error}",
                        attempt=attempt,
                        error=str(e).strip(),
                    )
                self.postgres_ok = False
                if self.stopping:
                    self._log.warn(
                        "Stopping with PostgreSQL unavailable: {count} entries stay pending",
                        count=len(self._held),
                    )
                    return None
                await self._sleep(delay)
                delay = min(delay * 2, self.config.retry_max)
                if kind == "timeout" and chunk > 1 and not self.stopping:
                    raise _Timeout() from e
                continue
            if not self.postgres_ok:
                self._log.info("PostgreSQL is reachable again")
            self.postgres_ok = True
            return outcome

    def _start_refresher(self) -> None:
        """Refresh every held entry each ``refresh_interval`` seconds, whatever the loop is
        doing (a slow write, a PostgreSQL outage, a read-ahead batch waiting): an entry is
        touched at most ``refresh_interval`` after it was read or last touched, and the
        options keep that at most half of ``claim_idle``."""
        self._refresher = LoopingCall(self._refresh_tick)
        self._refresher.clock = self.clock
        self._refresher.start(self.config.refresh_interval, now=False)

    def _refresh_tick(self) -> None:
        """One refresh at a time (a slow Redis must not stack them); never fails, so the
        LoopingCall never stops by itself."""
        if self._refreshing or not self._held or self.stopping:
            return
        self._refreshing = True

        def done(result: object) -> None:
            self._refreshing = False
            if isinstance(result, Failure):
                self._crash(result)

        Deferred.fromCoroutine(self._refresh_held()).addBoth(done)

    async def _refresh_held(self) -> None:
        """Reset the idle time of every entry this consumer holds (each batch in memory),
        so no peer claims them while a write is slow or PostgreSQL is failing; stop holding
        those a peer has already claimed (they are written by both: a duplicate, not a
        loss). Entries acknowledged while the refresh ran are no longer held when its reply
        arrives (same connection, replies in order), so they are not counted as lost."""
        held = sorted(self._held)
        try:
            lost = await self.streams.touch(held)
        except Exception as e:
            # Redis down too: the claim-idle clock keeps running, that's all
            self._redis_failed("Refreshing held entries", e)
            return
        self.metrics.entries_refreshed.inc(len(held) - len(lost))
        taken = [entry_id for entry_id in lost if entry_id in self._held]
        if taken:
            self._held.difference_update(taken)
            self.metrics.entries_taken_over.inc(len(taken))
            self._log.warn(
                "{count} held entries are no longer pending for this consumer (another "
                "claimed them meanwhile): not taken back",
                count=len(taken),
            )

    def _update_state(self, positions: list[Position], outcome: WriteOutcome) -> None:
        state = self.state
        if outcome.latest:
            self.metrics.devices_rehydrated.inc(len(outcome.latest))
            for snapshot in outcome.latest:
                state.hydrate(snapshot)
        rejected = {position.entry_id for position, _ in outcome.rejected}
        for position in positions:
            if position.entry_id not in rejected:
                state.apply(position)

    async def _acknowledge(self, dead: list[DeadLetter], ids: list[str]) -> bool:
        """Dead-letter and XACK (one idempotent script when there are letters), retrying
        while Redis fails; False if stopped first."""
        delay = self.config.retry_initial
        while True:
            try:
                if dead:
                    await self.streams.dead_letter(dead, ids, int(self.clock.seconds() * 1000))
                else:
                    await self.streams.ack(ids)
                self.redis_ok = True
                return True
            except Exception as e:
                self._redis_failed("Acknowledging a committed batch", e)
                if self.stopping:
                    self._log.warn(
                        "Stopping with Redis unavailable: {count} committed entries stay "
                        "pending (their redelivery is a duplicate, not a loss)",
                        count=len(ids),
                    )
                    return False
                await self._sleep(delay)
                delay = min(delay * 2, self.config.retry_max)
