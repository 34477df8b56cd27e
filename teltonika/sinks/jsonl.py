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

What the files promise, and where it is re-checked:

* One writer per file: each file is locked (``flock``) while the sink has it open, and a
  second server pointed at the same ``--output`` refuses to start. The torn-line guards
  below know only their own process's writes; two processes appending to one file could
  glue one's ACKed line onto the other's half-written one.
* Opening a file repairs a torn tail: a crash in the middle of ``write`` leaves half a
  line, and the first line appended after the restart would be glued onto it (so the
  first record ACKed after the restart would sit inside an unreadable line). A non-empty
  file whose last byte is not a newline gets one; the fragment itself stays, readers skip
  it. Its directory is fsynced at every start, not only when this process created the
  file: a crash between the create and that fsync leaves a file whose name might not
  survive a power loss, and the next start finds it already there.
* Opening happens on the writer thread, within ``open_timeout``: the repair and the
  directory fsync wait on the disk, and a disk that stops answering at start must not
  freeze the reactor (health checks, device connections). A start that takes longer
  fails, and the server refuses to run.
* After a failed write (``ENOSPC``, ``EIO``) the sink is not ready: frames are refused at
  once and ``/readyz`` answers 503. Every ``probe_interval`` a probe writes and fsyncs one
  newline into each file whose last write failed (that also ends its torn line); when it
  succeeds the sink is ready again.
* The writer thread is a daemon thread: a write stuck in a stalled disk cannot keep the
  process alive once the reactor stopped, so shutdown keeps its bound whatever the disk does.
"""

from __future__ import annotations

import fcntl
import os
import queue
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import attrs
import orjson
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from teltonika.contract import json_line
from teltonika.interfaces import IManagedSink
from teltonika.metrics import ServerMetrics
from teltonika.sinks import SinkError, SinkUnavailableError
from teltonika.sinks.batch import Batcher
from teltonika.units import SECONDS
from teltonika.wire.records import AVLRecord

RunInThread = Callable[..., "Deferred[Any]"]
"""``run(f, *args) -> Deferred``: run a blocking call off the reactor thread."""

DEFAULT_OUTPUT: Final = "teltonika-records.jsonl"
DEFAULT_MAX_PENDING_RECORDS: Final = 100_000
DEFAULT_PROBE_INTERVAL: Final = 1 * SECONDS
DEFAULT_OPEN_TIMEOUT: Final = 30 * SECONDS
"""Opening both files (tail repair, directory fsync) takes longer: the sink cannot start."""
_TAIL_CHUNK: Final = 64 * 1024
TAIL_SCAN_LIMIT: Final = 1024 * 1024
"""Bytes read back from the end of a file to measure a torn last line (for the log): a
torn JSON line is a few hundred bytes, so a longer run without a newline is not one of
ours, and is not read whole."""


_TORN_LINE: Final = (
    "{path} ended in a torn line of {length} bytes (a crash in the middle of a write, never "
    "ACKed); appending from a new line"
)
_LONG_FRAGMENT: Final = (
    "{path} ended in more than {length} bytes without a newline (not a line this server "
    "wrote?); appending from a new line"
)


class OutputInUseError(SinkError):
    """Another process (or another sink) already appends to the file."""


class OpenTimeoutError(SinkError):
    """Opening the files took longer than the sink's ``open_timeout``."""


def messages_path(path: Path) -> Path:
    """Where device messages go for a records file at *path*."""
    return path.with_name(path.stem + ".messages.jsonl")


def fsync_directory(path: Path) -> None:
    """fsync the directory *path*, making the names of files created in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _AppendFile:
    """A file opened for appending whose writes are fsynced (used from one thread only).

    Opening it locks it (one writer), then repairs a torn tail. The caller fsyncs
    :attr:`directory`.

    :ivar directory: where the file's name lives (the target's, if *path* is a symlink).
    :ivar torn_fragment: length of the unterminated last line found at open (0: none).
    :ivar fragment_capped: the fragment is longer than :data:`TAIL_SCAN_LIMIT` (then
        :attr:`torn_fragment` is that limit).
    :ivar tail_unchecked: the service may write the file but not read it, so the tail of
        a non-empty file could not be checked: a newline was written anyway (a blank line
        if the tail was whole)
    :ivar torn: the last write failed, so the file may end in half a line.
    :raise OutputInUseError: another open file description holds the lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.torn = False
        self.torn_fragment = 0
        self.fragment_capped = False
        self.tail_unchecked = False
        readable = True
        flags = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            # read access only to look at the tail (pread)
            self.fd = os.open(path, os.O_RDWR | flags, 0o644)
        except PermissionError:
            self.fd = os.open(path, os.O_WRONLY | flags, 0o644)
            readable = False
        try:
            self._lock()
            self.directory = Path(os.path.realpath(path)).parent
            if readable:
                self._repair_tail()
            else:
                self.tail_unchecked = self._start_new_line()
        except BaseException:
            os.close(self.fd)
            raise

    def _lock(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputInUseError(
                f"{self.path} is already appended to by another process (another server "
                "with the same --output?): give each server its own --output"
            ) from None

    def _start_new_line(self) -> bool:
        """Without read access: end whatever the last line is (a whole one gets a blank
        line after it, which readers skip); True when the file was not empty."""
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            return False
        self._write_and_sync(b"\n")
        return True

    def _repair_tail(self) -> None:
        """End a torn last line with a newline and measure the fragment (at most
        :data:`TAIL_SCAN_LIMIT` bytes are read back)."""
        info = os.fstat(self.fd)
        size = info.st_size
        if not stat.S_ISREG(info.st_mode) or size == 0:
            return
        if os.pread(self.fd, 1, size - 1) == b"\n":
            return
        floor = max(0, size - TAIL_SCAN_LIMIT)
        fragment = size - floor
        end = size
        while end > floor:
            start = max(floor, end - _TAIL_CHUNK)
            newline = os.pread(self.fd, end - start, start).rfind(b"\n")
            if newline >= 0:
                fragment = size - (start + newline + 1)
                break
            end = start
        else:
            self.fragment_capped = floor > 0
        self._write_and_sync(b"\n")
        self.torn_fragment = fragment

    def append(self, data: bytes) -> None:
        """Write all of *data* and fsync. After a failed write the next one starts on a new
        line, so a torn line never glues onto a good one."""
        self._write_and_sync(b"\n" + data if self.torn else data)

    def probe(self) -> None:
        """Write and fsync one newline: it ends a torn line, and proves that the file
        takes writes again."""
        self._write_and_sync(b"\n")

    def _write_and_sync(self, data: bytes) -> None:
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


class WriterThread:
    """One daemon thread that runs blocking calls in order and reports to the reactor.

    Why not Twisted's ``ThreadPool`` or ``concurrent.futures``: both use non-daemon
    threads and join them on stop or at interpreter exit, so one ``fsync`` stuck in a
    stalled disk would keep the process alive after the reactor stopped, past every
    shutdown bound. Stopping this one joins nothing.

    :param reactor: where results are delivered (``callFromThread``).
    """

    def __init__(self, reactor: IReactorFromThreads, name: str) -> None:
        self._reactor = reactor
        self._jobs: queue.SimpleQueue[
            tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run ``f(*args)`` on the thread after the calls before it; the Deferred fires
        (in the reactor thread) with its result or failure."""
        d: Deferred[Any] = Deferred()
        self._jobs.put((f, args, d))
        return d

    def stop(self) -> None:
        """Let the thread end after the calls already queued (it is not waited for)."""
        self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            f, args, d = job
            try:
                result = f(*args)
            except BaseException:
                self._reactor.callFromThread(d.errback, Failure())
            else:
                self._reactor.callFromThread(d.callback, result)


@attrs.frozen
class JsonLinesSinkSettings:
    """How a :class:`JsonLinesSink` bounds its backlog and retries (the defaults are what
    ``--output`` runs with; tests shorten them).

    :ivar max_pending_records: records accepted and not yet fsynced before the sink
        refuses more.
    :ivar probe_interval: seconds between probe writes while the sink is down.
    :ivar open_timeout: seconds :meth:`JsonLinesSink.start` may take to open the files.
    """

    max_pending_records: int = DEFAULT_MAX_PENDING_RECORDS
    probe_interval: float = DEFAULT_PROBE_INTERVAL
    open_timeout: float = DEFAULT_OPEN_TIMEOUT


@implementer(IManagedSink)
class JsonLinesSink:
    """Append records as JSON lines and fsync them in groups.

    :param path: the records file (created if missing, always appended to).
    :param settings: the backlog limit, the probe interval and the opening's bound.
    :param run_in_thread: runs the blocking write+fsync; default a dedicated
        :class:`WriterThread` started by :meth:`start`. Tests pass a synchronous runner.
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
        settings: JsonLinesSinkSettings = JsonLinesSinkSettings(),
        run_in_thread: RunInThread | None = None,
        reactor: IReactorFromThreads | None = None,
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        self.metrics = metrics
        self.instance_id = instance_id
        self.probe_interval = settings.probe_interval
        self.open_timeout = settings.open_timeout
        self._reactor = reactor
        self._thread: WriterThread | None = None
        self._run = run_in_thread
        self._records: _AppendFile | None = None
        self._messages: _AppendFile | None = None
        self._ready = False
        self._opened = False
        self._closed = False
        self._probe: LoopingCall | None = None
        self._batcher: Batcher[tuple[bytes, bytes]] = Batcher(
            clock, self._write, settings.max_pending_records
        )

    async def start(self) -> None:
        """Start the writer thread, and on it open (lock, create or repair) the files.

        :raise OutputInUseError: another process appends to a file already.
        :raise OpenTimeoutError: opening took longer than ``open_timeout`` (a disk that
            does not answer).
        :raise OSError: a file cannot be opened for appending.
        """
        if self._run is None:
            if self._reactor is None:
                from twisted.internet import reactor as global_reactor

                self._reactor = global_reactor  # type: ignore[assignment]
            assert self._reactor is not None
            self._thread = WriterThread(self._reactor, "teltonika-fsync")
            self._run = self._thread.run
        opening: Deferred[None] = self._run(self._open_files)
        opening.addTimeout(self.open_timeout, self.clock)
        try:
            await opening
        except defer.TimeoutError:
            self._stop_thread()
            raise OpenTimeoutError(
                f"opening {self.path} took more than {self.open_timeout:g} s (is the disk "
                "answering?)"
            ) from None
        except BaseException:
            self._stop_thread()
            raise
        for handle in (self._records, self._messages):
            assert handle is not None
            self._log_open(handle)
        self._opened = True
        self._ready = True
        self.metrics.sink_ready.set(1)
        self._probe = LoopingCall(self._probe_files)
        self._probe.clock = self.clock
        self._probe.start(self.probe_interval, now=False)
        self._log.info("File sink ready: appending records to {path}", path=str(self.path))

    def _open_files(self) -> None:
        """Runs on the writer thread: open both files, then fsync each directory once (the
        files' names are durable from here on, whoever created them)."""
        records = _AppendFile(self.path)
        try:
            messages = _AppendFile(messages_path(self.path))
        except BaseException:
            records.close()
            raise
        try:
            for directory in dict.fromkeys((records.directory, messages.directory)):
                fsync_directory(directory)
        except BaseException:
            records.close()
            messages.close()
            raise
        self._records, self._messages = records, messages

    def _log_open(self, handle: _AppendFile) -> None:
        path = str(handle.path)
        if handle.tail_unchecked:
            self._log.warn(
                "{path} is writable but not readable, so its last line cannot be checked for "
                "a torn write; appending from a new line",
                path=path,
                event="tail_unchecked",
            )
        elif handle.torn_fragment:
            self._log.warn(
                _LONG_FRAGMENT if handle.fragment_capped else _TORN_LINE,
                path=path,
                length=handle.torn_fragment,
                event="torn_tail",
            )

    async def close(self) -> None:
        """Write and fsync what is queued, then close the files and stop the thread.

        The files are closed by a job on the writer thread, after every job before it (a
        probe write still running, say): closed from here, a descriptor could be reused
        by another file while that write is still to come.

        The caller bounds this (``--shutdown-timeout``); if a write is stuck in the disk,
        the wait is cancelled and the daemon writer thread is left behind.
        """
        if self._probe is not None and self._probe.running:
            self._probe.stop()
        await self._batcher.when_idle()
        self._batcher.close()
        self._ready = False
        self._closed = True
        if self._run is not None:
            await self._run(self._close_files)
        self._stop_thread()

    def _close_files(self) -> None:
        """Runs on the writer thread (releases the locks too)."""
        for handle in (self._records, self._messages):
            if handle is not None:
                handle.close()
        self._records = self._messages = None

    def _stop_thread(self) -> None:
        """Let our writer thread end after its queued jobs; nothing runs on it after."""
        if self._thread is not None:
            self._thread.stop()
            self._thread = None
            self._run = None

    def ready(self) -> bool:
        """ISink API"""
        return self._ready

    def _refused(self) -> Deferred[None]:
        """A publish while not ready, failed with the reason (the log says why)."""
        if not self._opened:
            why = f"{self.path} is not open (yet)"
        else:
            why = f"{self.path} is not writable"
        return fail(SinkUnavailableError(why))

    def publish(
        self, imei: str, codec_name: str, records: tuple[AVLRecord, ...], received_at_ms: int
    ) -> Deferred[None]:
        """ISink API: the lines join the next group commit."""
        if not self._ready:
            return self._refused()
        instance_id = self.instance_id
        data = b"".join(
            json_line(imei, codec_name, record, received_at_ms, instance_id) for record in records
        )
        return self._batcher.submit((data, b""), len(records))

    def publish_message(self, imei: str, message: dict[str, str]) -> Deferred[None]:
        """ISink API: one line in the messages file, fsynced with the next group."""
        if not self._ready:
            return self._refused()
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
        self._set_ready(True, None)

    def _failed(self, failure: Failure) -> Failure:
        self._set_ready(False, failure.getErrorMessage())
        return failure

    # -- readiness -----------------------------------------------------------------------

    def _set_ready(self, ready: bool, why: str | None) -> None:
        """Record a change of readiness: one log event per transition, never per frame."""
        if ready == self._ready or self._closed:
            return
        self._ready = ready
        self.metrics.sink_ready.set(1 if ready else 0)
        if ready:
            self._log.info("File sink is up again: {path} takes writes", path=str(self.path))
        else:
            self._log.error(
                "File sink is down: writing {path} failed: {error}; refusing frames until a "
                "probe write succeeds",
                path=str(self.path),
                error=why,
            )

    def _probe_files(self) -> Deferred[None] | None:
        """Runs every ``probe_interval``, and writes only while the sink is down; never
        fails (a failing LoopingCall would stop for good)."""
        if self._ready or self._closed:
            return None
        assert self._run is not None
        d: Deferred[None] = self._run(self._probe_write)

        def ok(_: object) -> None:
            self._set_ready(True, None)

        def still_down(failure: Failure) -> None:
            self._log.debug("File sink probe failed: {error}", error=failure.getErrorMessage())

        return d.addCallbacks(ok, still_down)

    def _probe_write(self) -> None:
        """Runs on the writer thread: a newline into each file whose last write failed."""
        if self._records is None or self._messages is None:
            raise SinkUnavailableError("the sink is closed")
        for handle in (self._messages, self._records):
            if handle.torn:
                handle.probe()
