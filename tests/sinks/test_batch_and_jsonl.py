"""Group commit (Batcher) and the JSON-lines sink."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import orjson
import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from zope.interface.verify import verifyObject

from teltonika.contract import json_line
from teltonika.interfaces import IManagedSink
from teltonika.metrics import ServerMetrics
from teltonika.sinks import SinkClosedError, SinkOverloadedError, SinkUnavailableError
from teltonika.sinks.batch import Batcher
from teltonika.sinks.jsonl import (
    TAIL_SCAN_LIMIT,
    JsonLinesSink,
    OpenTimeoutError,
    OutputInUseError,
    messages_path,
)
from teltonika.sinks.redis_stream import RedisStreamSink
from tests.helpers import (
    IMEI,
    ControlledSink,
    connection_double,
    failureResultOf,
    record,
    successResultOf,
)


def test_every_sink_provides_the_managed_sink_interface(tmp_path: Path) -> None:
    """The file sink, the Redis sink and the tests' sink all declare and fully provide
    IManagedSink (ISink plus start/close), the one type the ingestion service takes.
    Building a sink opens nothing, so none is started here."""
    metrics = ServerMetrics.create(CollectorRegistry())
    sinks = [
        JsonLinesSink(tmp_path / "out.jsonl", Clock(), metrics, instance_id="test-1"),
        RedisStreamSink(_no_connection, Clock(), metrics, instance_id="test-1"),
        ControlledSink(),
    ]
    for sink in sinks:
        assert IManagedSink.providedBy(sink)
        assert verifyObject(IManagedSink, sink)


def _no_connection() -> NoReturn:
    raise AssertionError("a sink that is only built must not connect")


class Writes:
    """A batch writer whose Deferreds the test fires."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[Any], Deferred[None]]] = []

    def __call__(self, items: list[Any]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.batches.append((items, d))
        return d


def test_batcher_groups_one_turn_into_one_write() -> None:
    """Everything submitted in one reactor turn goes out in one write."""
    clock, writes = Clock(), Writes()
    batcher: Batcher[str] = Batcher(clock, writes, 100)
    ds = [batcher.submit(x) for x in "abc"]
    assert writes.batches == []
    clock.advance(0)
    assert [items for items, _ in writes.batches] == [["a", "b", "c"]]
    assert not any(d.called for d in ds)
    writes.batches[0][1].callback(None)
    assert all(successResultOf(d) is None for d in ds)


def test_batcher_one_write_in_flight_next_batch_waits() -> None:
    """While a write is in flight new items wait and then share the next write."""
    clock, writes = Clock(), Writes()
    batcher: Batcher[str] = Batcher(clock, writes, 100)
    batcher.submit("a")
    clock.advance(0)
    d2, d3 = batcher.submit("b"), batcher.submit("c")
    clock.advance(0)
    assert len(writes.batches) == 1
    writes.batches[0][1].callback(None)
    clock.advance(0)
    assert [items for items, _ in writes.batches] == [["a"], ["b", "c"]]
    assert d2.called == False  # noqa: E712 (`not` would narrow it for mypy past the next call)
    writes.batches[1][1].callback(None)
    assert d2.called and d3.called


def test_batcher_several_writes_in_flight() -> None:
    """With max_in_flight=2 a second batch leaves while the first is in flight; a third
    waits for a free slot; each write's outcome fires only its own items."""
    clock, writes = Clock(), Writes()
    batcher: Batcher[str] = Batcher(clock, writes, 100, max_in_flight=2)
    d1 = batcher.submit("a")
    clock.advance(0)
    d2 = batcher.submit("b")
    clock.advance(0)
    d3 = batcher.submit("c")
    clock.advance(0)
    assert [items for items, _ in writes.batches] == [["a"], ["b"]]
    assert batcher.pending == 3
    writes.batches[1][1].errback(OSError("EIO"))  # the second answers first, failed
    failureResultOf(d2, OSError)
    assert not d1.called
    clock.advance(0)
    assert [items for items, _ in writes.batches][2:] == [["c"]]
    writes.batches[0][1].callback(None)
    writes.batches[2][1].callback(None)
    assert successResultOf(d1) is None and successResultOf(d3) is None
    assert batcher.pending == 0
    assert successResultOf(batcher.when_idle()) is None


def test_batcher_idle_waits_for_every_write_in_flight() -> None:
    """when_idle (shutdown) fires only once no write of several is in flight."""
    clock, writes = Clock(), Writes()
    batcher: Batcher[str] = Batcher(clock, writes, 100, max_in_flight=3)
    batcher.submit("a")
    clock.advance(0)
    batcher.submit("b")
    clock.advance(0)
    idle = batcher.when_idle()
    writes.batches[0][1].callback(None)
    assert not idle.called
    writes.batches[1][1].callback(None)
    assert idle.called


def test_batcher_cut_batch_leaves_at_once_when_a_slot_is_free() -> None:
    """A batch cut at max_batch sends its remainder next turn if a slot is free."""
    clock, writes = Clock(), Writes()
    batcher: Batcher[str] = Batcher(clock, writes, 100, max_batch=2, max_in_flight=2)
    for x in "abcde":
        batcher.submit(x)
    clock.advance(0)
    clock.advance(0)
    assert [items for items, _ in writes.batches] == [["a", "b"], ["c", "d"]]
    writes.batches[0][1].callback(None)
    clock.advance(0)
    assert [items for items, _ in writes.batches][2:] == [["e"]]


def test_batcher_failure_fails_every_item_of_the_batch() -> None:
    """A failed write fails all its items (none may be assumed stored), not later ones."""
    clock, writes = Clock(), Writes()
    batcher: Batcher[str] = Batcher(clock, writes, 100)
    d1, d2 = batcher.submit("a"), batcher.submit("b")
    clock.advance(0)
    d3 = batcher.submit("c")
    writes.batches[0][1].errback(OSError("EIO"))
    failureResultOf(d1, OSError)
    failureResultOf(d2, OSError)
    clock.advance(0)
    writes.batches[1][1].callback(None)
    assert successResultOf(d3) is None


def test_batcher_bounded() -> None:
    """Beyond max_pending (weights of waiting and in-flight items) submits fail at once."""
    clock, writes = Clock(), Writes()
    batcher: Batcher[str] = Batcher(clock, writes, 10)
    batcher.submit("a", 6)
    clock.advance(0)
    failureResultOf(batcher.submit("b", 5), SinkOverloadedError)
    batcher.submit("c", 4)
    assert batcher.pending == 10


def test_batcher_tolerates_cancelled_items() -> None:
    """An item whose caller timed out (cancelled) does not break the batch."""
    clock, writes = Clock(), Writes()
    batcher: Batcher[str] = Batcher(clock, writes, 10)
    d1, d2 = batcher.submit("a"), batcher.submit("b")
    clock.advance(0)
    d1.cancel()
    failureResultOf(d1)
    writes.batches[0][1].callback(None)
    assert successResultOf(d2) is None


def test_batcher_close_fails_waiting_items_and_refuses_new() -> None:
    clock, writes = Clock(), Writes()
    batcher: Batcher[str] = Batcher(clock, writes, 10)
    d = batcher.submit("a")
    batcher.close()
    failureResultOf(d, SinkClosedError)
    failureResultOf(batcher.submit("b"), SinkClosedError)
    clock.advance(0)
    assert writes.batches == []


def _sync_sink(path: Path) -> tuple[JsonLinesSink, Clock, ServerMetrics, list[int]]:
    clock = Clock()
    metrics = ServerMetrics.create(CollectorRegistry())
    calls: list[int] = []

    def run(f: Any, *args: Any) -> Deferred[Any]:
        calls.append(1)
        return maybeDeferred(f, *args)

    sink = JsonLinesSink(path, clock, metrics, instance_id="test-1", run_in_thread=run)
    successResultOf(Deferred.fromCoroutine(sink.start()))
    calls.clear()  # the open ran through the runner too
    return sink, clock, metrics, calls


class QueuedRunner:
    """A writer thread the test drives: jobs wait in order until :meth:`run_next`."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_next(self) -> None:
        f, args, d = self.jobs.pop(0)
        maybeDeferred(f, *args).chainDeferred(d)


def test_jsonl_lines_match_contract_and_share_one_commit(tmp_path: Path) -> None:
    """Frames from several devices in one turn: one write+fsync, lines = json_line."""
    path = tmp_path / "records.jsonl"
    sink, clock, metrics, calls = _sync_sink(path)
    recs = (record(1), record(2, io=((78, 8, 2**60), (10, 0, b"\x01\x02"))))
    d1 = sink.publish(IMEI, "8E", recs, 1234)
    d2 = sink.publish("490154203237518", "8", (record(3),), 1235)
    assert not d1.called
    clock.advance(0)
    assert successResultOf(d1) is None and successResultOf(d2) is None
    assert len(calls) == 1
    expected = (
        json_line(IMEI, "8E", recs[0], 1234, "test-1")
        + json_line(IMEI, "8E", recs[1], 1234, "test-1")
        + json_line("490154203237518", "8", record(3), 1235, "test-1")
    )
    assert path.read_bytes() == expected
    line = orjson.loads(expected.splitlines()[1])
    assert line["io"] == {"78": {"__bigint": str(2**60)}, "10": {"__buffer_b64": "AQI="}}
    assert metrics.registry.get_sample_value("teltonika_sink_batches_total", {"sink": "file"}) == 1
    successResultOf(Deferred.fromCoroutine(sink.close()))


def test_jsonl_messages_go_to_sibling_file(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    sink, clock, _, _ = _sync_sink(path)
    d = sink.publish_message(IMEI, {"v": "1", "imei": IMEI, "text": "hi"})
    clock.advance(0)
    successResultOf(d)
    expected = b'{"v":"1","imei":"' + IMEI.encode() + b'","text":"hi"}\n'
    assert messages_path(path).read_bytes() == expected
    assert path.read_bytes() == b""


def test_jsonl_appends_to_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"old":1}\n')
    sink, clock, _, _ = _sync_sink(path)
    d = sink.publish(IMEI, "8", (record(),), 1)
    clock.advance(0)
    successResultOf(d)
    assert path.read_bytes().startswith(b'{"old":1}\n{"v":"1"')


def test_jsonl_write_failure_fails_publish_and_makes_the_sink_not_ready(
    tmp_path: Path, logged_errors: Any
) -> None:
    """A failed write (ENOSPC, EIO) fails its publish (no ACK), and the sink turns not
    ready: publishes are refused at once, the gauge reads 0, one error is logged however
    many frames are refused. A probe write every probe_interval brings it back by itself;
    the probe's newline ends the torn line, so the next record starts on a line of its own."""
    path = tmp_path / "records.jsonl"
    sink, clock, metrics, _ = _sync_sink(path)
    assert sink._records is not None
    real_fd = sink._records.fd
    sink._records.fd = os.open(tmp_path, os.O_RDONLY)  # writing a directory fd fails
    d = sink.publish(IMEI, "8", (record(),), 1)
    clock.advance(0)
    failureResultOf(d, OSError)
    assert not sink.ready()
    assert metrics.registry.get_sample_value("teltonika_sink_ready") == 0
    for _ in range(3):
        failureResultOf(sink.publish(IMEI, "8", (record(),), 1), SinkUnavailableError)
    failureResultOf(sink.publish_message(IMEI, {"v": "1"}), SinkUnavailableError)
    clock.advance(sink.probe_interval)  # the probe fails too: still down, nothing logged
    assert not sink.ready()
    [event] = logged_errors.flush()
    assert "File sink is down" in event["log_format"]
    os.close(sink._records.fd)
    sink._records.fd = real_fd
    clock.advance(sink.probe_interval)
    assert sink.ready()
    assert metrics.registry.get_sample_value("teltonika_sink_ready") == 1
    d = sink.publish(IMEI, "8", (record(),), 1)
    clock.advance(0)
    successResultOf(d)
    assert path.read_bytes().startswith(b"\n{")
    assert messages_path(path).read_bytes() == b""  # its writes never failed: no probe
    successResultOf(Deferred.fromCoroutine(sink.close()))


@pytest.mark.parametrize("which", ["records", "messages"])
def test_jsonl_torn_tail_is_repaired_at_open(tmp_path: Path, which: str) -> None:
    """A file that ends in half a line (a crash in the middle of a write) gets a newline at
    open, logged with the file and the fragment's length; the fragment stays as it is and
    the first line written after the restart parses."""
    path = tmp_path / "records.jsonl"
    target = path if which == "records" else messages_path(path)
    target.write_bytes(b'{"old":1}\n{"v":"1","imei":"35630')
    with capturedLogs() as events:
        sink, clock, _, _ = _sync_sink(path)
    [event] = [e for e in events if e.get("event") == "torn_tail"]
    assert event["path"] == str(target) and event["length"] == 22
    if which == "records":
        d = sink.publish(IMEI, "8", (record(),), 1)
    else:
        d = sink.publish_message(IMEI, {"v": "1", "imei": IMEI})
    clock.advance(0)
    successResultOf(d)
    lines = target.read_bytes().split(b"\n")
    assert lines[:2] == [b'{"old":1}', b'{"v":"1","imei":"35630']
    assert orjson.loads(lines[2])["imei"] == IMEI
    assert lines[3:] == [b""]


def test_jsonl_whole_lines_and_empty_files_are_left_alone(tmp_path: Path) -> None:
    """No repair (and no log) for a file ending in a newline or an empty one."""
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"old":1}\n')
    messages_path(path).write_bytes(b"")
    with capturedLogs() as events:
        _sync_sink(path)
    assert [e for e in events if e.get("event") == "torn_tail"] == []
    assert path.read_bytes() == b'{"old":1}\n'
    assert messages_path(path).read_bytes() == b""


@pytest.fixture
def synced_directories(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories fsynced during the test, in order."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_jsonl_created_files_have_their_directory_fsynced(
    tmp_path: Path, synced_directories: list[str]
) -> None:
    """Creating the records and messages files fsyncs their directory: without it a power
    loss can lose the new file's name, and with it every record ACKed into the file."""
    synced = synced_directories
    sink = _sync_sink(tmp_path / "records.jsonl")[0]
    assert synced == [str(tmp_path)]  # both files live there: one fsync
    successResultOf(Deferred.fromCoroutine(sink.close()))
    synced.clear()
    _sync_sink(tmp_path / "records.jsonl")
    assert synced == [str(tmp_path)]


def test_jsonl_directory_is_fsynced_at_every_start(
    tmp_path: Path, synced_directories: list[str]
) -> None:
    """A crash after the file was created but before its directory was fsynced leaves a
    file that exists at the next start while its name is still not durable: the directory
    is fsynced at every start, whoever created the file (the real directory, when
    --output is a symlink)."""
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    (real_dir / "records.jsonl").write_bytes(b"")
    link_dir = tmp_path / "link"
    link_dir.mkdir()
    (link_dir / "records.jsonl").symlink_to(real_dir / "records.jsonl")
    _sync_sink(link_dir / "records.jsonl")
    # records: the symlink's target lives in real/; messages: created in link/
    assert sorted(synced_directories) == sorted([str(real_dir), str(link_dir)])


@pytest.mark.parametrize("second_output", ["records.jsonl", "records.messages.jsonl"])
def test_jsonl_a_second_writer_of_a_file_is_refused(tmp_path: Path, second_output: str) -> None:
    """Each file is locked while a sink has it open, so a second sink (another server
    given the same --output, or an --output that is the first one's messages file) fails
    to start, with a sentence naming the file and --output; once the first one closed, the
    file can be opened again."""
    first, clock, _, _ = _sync_sink(tmp_path / "records.jsonl")
    second = JsonLinesSink(
        tmp_path / second_output,
        Clock(),
        ServerMetrics.create(CollectorRegistry()),
        instance_id="test-2",
        run_in_thread=maybeDeferred,
    )
    failure = failureResultOf(Deferred.fromCoroutine(second.start()), OutputInUseError)
    assert "--output" in str(failure.value) and "another process" in str(failure.value)
    assert not second.ready()
    d = first.publish(IMEI, "8", (record(1),), 1)  # the first one is unaffected
    clock.advance(0)
    successResultOf(d)
    successResultOf(Deferred.fromCoroutine(first.close()))
    successResultOf(Deferred.fromCoroutine(second.start()))
    assert second.ready()


def test_jsonl_files_open_on_the_writer_thread_within_a_bound(tmp_path: Path) -> None:
    """Opening (tail repair, directory fsync) waits on the disk, so it runs on the writer
    thread, never on the caller's (the reactor's: a stalled disk at start would freeze
    health checks and every connection); a start that takes longer than open_timeout
    fails, so the server refuses to run instead of hanging."""
    path = tmp_path / "records.jsonl"
    clock, runner = Clock(), QueuedRunner()
    sink = JsonLinesSink(
        path,
        clock,
        ServerMetrics.create(CollectorRegistry()),
        instance_id="t",
        run_in_thread=runner,
    )
    started = Deferred.fromCoroutine(sink.start())
    assert not path.exists() and not started.called  # nothing touched the disk here
    assert len(runner.jobs) == 1
    failure = failureResultOf(sink.publish(IMEI, "8", (record(),), 1), SinkUnavailableError)
    assert "is not open" in str(failure.value)
    clock.advance(sink.open_timeout)
    failure = failureResultOf(started, OpenTimeoutError)
    assert f"took more than {sink.open_timeout:g} s" in str(failure.value)
    assert not sink.ready()
    runner.run_next()  # the disk answers at last: too late, nothing breaks


def test_jsonl_close_waits_for_a_probe_still_running(tmp_path: Path, logged_errors: Any) -> None:
    """close() while a probe write is still on the writer thread: the files are closed by
    a job behind it, so the probe's newline lands in our file. (Closed from the reactor
    thread, a descriptor could be reused by another file before the probe writes to it.)"""
    path = tmp_path / "records.jsonl"
    clock, runner = Clock(), QueuedRunner()
    sink = JsonLinesSink(
        path,
        clock,
        ServerMetrics.create(CollectorRegistry()),
        instance_id="t",
        run_in_thread=runner,
    )
    started = Deferred.fromCoroutine(sink.start())
    runner.run_next()
    successResultOf(started)
    assert sink._records is not None
    real_fd = sink._records.fd
    sink._records.fd = os.open(tmp_path, os.O_RDONLY)  # writing a directory fd fails
    d = sink.publish(IMEI, "8", (record(),), 1)
    clock.advance(0)
    runner.run_next()
    failureResultOf(d, OSError)
    logged_errors.flush(
        "File sink is down: writing {path} failed: {error}; refusing frames "
        "until a probe write succeeds"
    )
    os.close(sink._records.fd)
    sink._records.fd = real_fd
    clock.advance(sink.probe_interval)  # the probe is queued on the writer thread
    assert len(runner.jobs) == 1
    closing = Deferred.fromCoroutine(sink.close())
    assert not closing.called
    os.fstat(real_fd)  # still open: the probe has yet to write to it
    runner.run_next()  # the probe
    runner.run_next()  # the close, behind it
    successResultOf(closing)
    assert path.read_bytes() == b"\n"
    with pytest.raises(OSError):
        os.fstat(real_fd)


def test_jsonl_torn_tail_scan_is_bounded(tmp_path: Path) -> None:
    """A file ending in more than TAIL_SCAN_LIMIT bytes without a newline (not a torn
    line of ours) is repaired without being read whole; the log says "more than"."""
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"x" * (TAIL_SCAN_LIMIT + 5))
    with capturedLogs() as events:
        sink = _sync_sink(path)[0]
    [event] = [e for e in events if e.get("event") == "torn_tail"]
    assert event["length"] == TAIL_SCAN_LIMIT and "more than" in event["log_format"]
    successResultOf(Deferred.fromCoroutine(sink.close()))
    assert path.read_bytes().endswith(b"x\n")


def test_jsonl_file_writable_but_not_readable_starts_a_new_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tail check reads the file; a file the service may append to but not read (the
    tests run as root, so the refusal is simulated) still opens: a newline goes in
    blindly (a blank line if the tail was whole; readers skip it) and a warning says the
    tail could not be checked."""
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"old":1}\n{"torn')
    real_open = os.open

    def no_read(file: Any, flags: int, *args: Any) -> int:
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", no_read)
    with capturedLogs() as events:
        sink, clock, _, _ = _sync_sink(path)
    assert [e["path"] for e in events if e.get("event") == "tail_unchecked"] == [str(path)]
    d = sink.publish(IMEI, "8", (record(),), 1)
    clock.advance(0)
    successResultOf(d)
    lines = path.read_bytes().split(b"\n")
    assert lines[:2] == [b'{"old":1}', b'{"torn']
    assert orjson.loads(lines[2])["imei"] == IMEI
    assert messages_path(path).read_bytes() == b""  # empty: nothing to end


def test_jsonl_not_ready_before_start(tmp_path: Path) -> None:
    sink = JsonLinesSink(
        tmp_path / "x", Clock(), ServerMetrics.create(CollectorRegistry()), instance_id="i"
    )
    assert not sink.ready()
    failureResultOf(sink.publish(IMEI, "8", (record(),), 1), SinkUnavailableError)


@pytest_twisted.ensureDeferred
async def test_jsonl_real_thread_fsync(tmp_path: Path) -> None:
    """With the real reactor the write+fsync runs on the writer thread; close flushes."""
    from twisted.internet import reactor

    path = tmp_path / "records.jsonl"
    threads = IReactorFromThreads(reactor)
    sink = JsonLinesSink(
        path, reactor, ServerMetrics.create(CollectorRegistry()), instance_id="t", reactor=threads
    )
    await sink.start()
    ds = [sink.publish(IMEI, "8E", (record(i),), i) for i in range(50)]
    closing = Deferred.fromCoroutine(sink.close())
    for d in ds:
        await d
    await closing
    assert len(path.read_bytes().splitlines()) == 50
    assert not sink.ready()


class _HeldRedis:
    """A stand-in connection whose replies the test fires (PING, nothing else)."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], Deferred[Any]]] = []

    def execute_command(self, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((args, d))
        return d


def test_redis_sink_probe_in_flight_at_close_reports_nothing(logged_errors: Any) -> None:
    """A readiness probe still waiting when the sink closes, and failing afterwards (the
    connection is being torn down), neither logs "sink is down" nor flips readiness."""
    from teltonika.sinks.redis_stream import RedisSinkSettings, RedisStreamSink

    clock, redis = Clock(), _HeldRedis()
    metrics = ServerMetrics.create(CollectorRegistry())
    sink = RedisStreamSink(
        lambda: connection_double(redis),
        clock,
        metrics,
        instance_id="i",
        settings=RedisSinkSettings(probe_interval=1.0, probe_timeout=5.0),
    )
    started = Deferred.fromCoroutine(sink.start())
    redis.calls[0][1].callback(b"PONG")  # the durability check's PING
    assert successResultOf(started) is None and sink.ready()
    clock.advance(1.0)  # the probe's PING goes out and waits
    assert len(redis.calls) == 2
    successResultOf(Deferred.fromCoroutine(sink.close()))
    redis.calls[1][1].errback(ConnectionError("Lost connection"))
    assert logged_errors.events == []
    assert metrics.registry.get_sample_value("teltonika_sink_ready") == 1


EMBEDDED_SHUTDOWN_WITH_STALLED_DISK = """
import os, sys, threading
_real_fsync = os.fsync
def _fsync(fd):
    if os.path.exists(sys.argv[2]):  # the disk stops answering: fsync never returns
        threading.Event().wait()
    return _real_fsync(fd)
os.fsync = _fsync

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from teltonika.tap import Options, makeService
from tests.helpers import IMEI, record

options = Options()
options.parseOptions(["--output", sys.argv[1], "--metrics", "off", "--shutdown-timeout", "0.2",
                      "--port", "tcp:0:interface=127.0.0.1"])
service = makeService(options)

async def scenario():
    await service.server.ingestion.started  # the files open on the writer thread
    sink = service.server.sink
    await sink.publish(IMEI, "8", (record(1),), 1)
    open(sys.argv[2], "w").close()
    sink.publish(IMEI, "8", (record(2),), 2).addErrback(lambda _: None)
    await service.stopService()  # the sink's close is cancelled after --shutdown-timeout
    print("stopped", flush=True)
    reactor.stop()

service.privilegedStartService()
service.startService()
reactor.callWhenRunning(lambda: Deferred.fromCoroutine(scenario()))
reactor.run()
"""


def test_a_write_stuck_in_a_stalled_disk_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    """An fsync that never returns, then a shutdown that does not end in a signal (a
    program embedding the service stops its reactor): the process still exits once the
    reactor stopped. The writer thread stuck in fsync is a daemon thread, so the
    interpreter does not wait for it."""
    from tests.servers import REPO, checkout_env

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            EMBEDDED_SHUTDOWN_WITH_STALLED_DISK,
            str(tmp_path / "records.jsonl"),
            str(tmp_path / "stall"),
        ],
        cwd=REPO,
        env=checkout_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out, _ = child.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        out, _ = child.communicate()
        raise AssertionError(f"the process outlived its reactor:\n{out.decode()}") from None
    assert child.returncode == 0, out.decode()
    assert b"stopped" in out
