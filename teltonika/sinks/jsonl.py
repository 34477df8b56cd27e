"""The embedded default sink: append-only JSON lines, fsynced before any ACK.

This is what ``twistd -n teltonika --port 5027`` uses when no ``--redis`` is given: one
JSON object a line per AVL record, in the record contract's shape
(:func:`teltonika.contract.json_line`), at ``--output``. Device messages (codec 12/13/14)
go to a sibling file ``<output stem>.messages.jsonl``.

Group commit: the lines of every frame that arrived while the previous write+fsync ran
are joined into one ``write`` + ``fsync``, so a thousand connections share one fsync.
The blocking calls run on one dedicated thread (never the reactor thread, and never
Twisted's shared pool, where they would queue behind unrelated work); one thread is
enough because batches are written strictly one after the other.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from teltonika.contract import json_line
from teltonika.interfaces import ISink
from teltonika.metrics import ServerMetrics
from teltonika.sinks import SinkUnavailableError
from teltonika.sinks.batch import Batcher
from teltonika.wire.records import AVLRecord

R = TypeVar("R")
RunInThread = Callable[..., "Deferred[Any]"]
"""``run(f, *args) -> Deferred``: run a blocking call off the reactor thread."""

DEFAULT_OUTPUT: Final = "teltonika-records.jsonl"
DEFAULT_MAX_PENDING_RECORDS: Final = 100_000


def messages_path(path: Path) -> Path:
    """Where device messages go for a records file at *path*."""
    return path.with_name(path.stem + ".messages.jsonl")


class _AppendFile:
    """A file opened for appending whose writes are fsynced (used from one thread only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.torn = False

    def append(self, data: bytes) -> None:
        """Write all of *data* and fsync. After a failed write the next one starts on a new
        line, so a torn line never glues onto a good one."""
        if self.torn:
            data = b"\n" + data
        try:
            view = memoryview(data)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
            os.fsync(self.fd)
        except OSError:
            self.torn = True
            raise
        self.torn = False

    def close(self) -> None:
        os.close(self.fd)


@implementer(ISink)
class JsonLinesSink:
    """Append records as JSON lines and fsync them in groups.

    :param path: the records file (created if missing, always appended to).
    :param run_in_thread: runs the blocking write+fsync; default a dedicated thread
        started by :meth:`start`. Tests pass a synchronous runner.
    """

    name = "file"
    _log = Logger()

    def __init__(
        self,
        path: str | Path,
        clock: IReactorTime,
        metrics: ServerMetrics,
        *,
        instance_id: str,
        run_in_thread: RunInThread | None = None,
        reactor: IReactorFromThreads | None = None,
        max_pending_records: int = DEFAULT_MAX_PENDING_RECORDS,
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        self.metrics = metrics
        self.instance_id = instance_id
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._run = run_in_thread
        self._records: _AppendFile | None = None
        self._messages: _AppendFile | None = None
        self._ready = False
        self._batcher: Batcher[tuple[bytes, bytes]] = Batcher(
            clock, self._write, max_pending_records
        )

    async def start(self) -> None:
        """Open (create) the files and start the writer thread.

        :raise OSError: the file cannot be opened for appending.
        """
        self._records = _AppendFile(self.path)
        self._messages = _AppendFile(messages_path(self.path))
        if self._run is None:
            if self._reactor is None:
                from twisted.internet import reactor as global_reactor

                self._reactor = global_reactor  # type: ignore[assignment]
            pool = ThreadPool(minthreads=1, maxthreads=1, name="teltonika-fsync")
            pool.start()
            self._pool = pool
            reactor = self._reactor

            def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
                return deferToThreadPool(reactor, pool, f, *args)  # type: ignore[arg-type]

            self._run = run
        self._ready = True
        self.metrics.sink_ready.set(1)
        self._log.info("File sink ready: appending records to {path}", path=str(self.path))

    async def close(self) -> None:
        """Write and fsync what is queued, then close the files and stop the thread."""
        await self._batcher.when_idle()
        self._batcher.close()
        self._ready = False
        for handle in (self._records, self._messages):
            if handle is not None:
                handle.close()
        self._records = self._messages = None
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    def ready(self) -> bool:
        """ISink API"""
        return self._ready

    def publish(
        self, imei: str, codec_name: str, records: tuple[AVLRecord, ...], received_at_ms: int
    ) -> Deferred[None]:
        """ISink API: the lines join the next group commit."""
        if not self._ready:
            return fail(SinkUnavailableError(f"{self.path} is not open"))
        instance_id = self.instance_id
        data = b"".join(
            json_line(imei, codec_name, record, received_at_ms, instance_id) for record in records
        )
        return self._batcher.submit((data, b""), len(records))

    def publish_message(self, imei: str, message: dict[str, str]) -> Deferred[None]:
        """ISink API: one line in the messages file, fsynced with the next group."""
        if not self._ready:
            return fail(SinkUnavailableError(f"{self.path} is not open"))
        line = orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)
        return self._batcher.submit((b"", line))

    def _write(self, items: list[tuple[bytes, bytes]]) -> Deferred[None]:
        records = b"".join(item[0] for item in items)
        messages = b"".join(item[1] for item in items)
        assert self._run is not None
        d: Deferred[None] = self._run(self._append, records, messages)
        d.addCallback(self._written)
        d.addErrback(self._failed)
        return d

    def _append(self, records: bytes, messages: bytes) -> None:
        """Runs on the writer thread."""
        if self._records is None or self._messages is None:
            raise SinkUnavailableError("the sink is closed")
        if messages:
            self._messages.append(messages)
        if records:
            self._records.append(records)

    def _written(self, _: object) -> None:
        self.metrics.sink_batches.labels(self.name).inc()

    def _failed(self, failure: Any) -> Any:
        self._log.error(
            "Writing {path} failed: {error}", path=str(self.path), error=failure.getErrorMessage()
        )
        return failure
