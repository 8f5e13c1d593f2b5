"""The ``file://<dir>`` event log, the embedded default: each writer appends JSON lines to its own
in-progress file under ``<dir>/.inprogress``; an append returns once its events are written
and fsynced (group commit: concurrent appends share one write and one fsync), so an
acknowledged event survives a crash. At most every ``rotate_ms`` or ``rotate_events`` the
file is sealed — an atomic rename into ``<dir>/segments``. A segment therefore appears
complete or not at all, which is exactly what Flink's FileSource in continuous-monitoring
mode needs to read every event once. A failed write (disk full, I/O error) is truncated
away and raises :class:`EventLogError`; the writer retries on the next append and tick.
Writers hold an ``flock`` on their in-progress file; every writer seals unlocked ones (their
owner died) at start and every ``orphan_seal_ms``, so nothing accepted is lost across crashes.

Segment lines are *bundles*: up to ``bundle_events`` JSON events separated by the ASCII
record separator (RS, 0x1e, as in RFC 7464 JSON text sequences), a newline after every
bundle. A Flink record is one line, so the feature job pays its per-record cost (~30 us
per Python operator hop, measured) once per bundle rather than once per event: at
``bundle_events = 1`` the file is plain JSON lines. :func:`split_bundle` is the one
place that reads a bundle; readers and jobs return single events.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from core.events import BaseEvent
from features.eventlog import NL_BYTES, RS_BYTES, EventLogError, encode_line, log

SEGMENT_SUFFIX = ".jsonl"
SEGMENTS_DIR = "segments"
INPROGRESS_DIR = ".inprogress"


class _Commit:
    """One caller's lines in the group-commit queue, and how their commit ended."""

    __slots__ = ("lines", "done", "error")

    def __init__(self, lines: list[bytes]):
        self.lines = lines
        self.done = False
        self.error: BaseException | None = None


class FileEventLog:
    """Append-only segment log in a local directory (see module docstring).

    An append returns once its events are on disk (written and fsynced; with ``fsync=False``
    written to the OS, which survives a crash of the process but not of the machine). Appends
    from many threads are group-committed: one caller writes and fsyncs everything queued
    while the previous fsync ran, then answers all of them. A failed write or fsync is
    truncated away (the file never keeps a torn line) and raises :class:`EventLogError`;
    the next append, and the rotate thread, simply try again.
    """

    def __init__(self, root: str | Path, rotate_ms: int = 500, rotate_events: int = 20_000, fsync: bool = True,
                 bundle_events: int = 1024, orphan_seal_ms: int = 2000):
        self.root = Path(root)
        self.uri = "file://" + str(self.root)
        self.segments = self.root / SEGMENTS_DIR
        self.inprogress = self.root / INPROGRESS_DIR
        self.segments.mkdir(parents=True, exist_ok=True)
        self.inprogress.mkdir(parents=True, exist_ok=True)
        self.rotate_s = rotate_ms / 1000.0
        self.rotate_events = max(1, rotate_events)
        self.fsync = fsync
        self.bundle_events = max(1, bundle_events)
        self.orphan_seal_s = orphan_seal_ms / 1000.0
        self.writer_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._lock = threading.Lock()  # the current file: writes, syncs, seals
        self._cv = threading.Condition(threading.Lock())  # the commit queue and its leader
        self._queue: list[_Commit] = []
        self._leader = False
        self._closed = False
        self._seq = 0
        self._fh: Any = None  # unbuffered FileIO (O_APPEND) of the current in-progress file
        self._path: Path | None = None
        self._opened = 0.0
        self._size = 0  # bytes written to the current file
        self._in_bundle = 0  # events on the current, unterminated line
        self._count = 0  # events in the current file
        self._good = (0, 0, 0)  # (size, in_bundle, count) as last made durable: where a failed write is cut back to
        self._torn = False  # a failed write could not be truncated away yet
        self.commits = self.failed_commits = 0  # group commits (one write + one fsync each), and failed ones
        self._failing = False  # the rotate thread's last seal failed (log once per streak)
        self.recover()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="eventlog-rotate", daemon=True)
        self._ticker.start()

    # -- writing
    def append(self, event: BaseEvent | dict[str, Any] | str) -> None:
        self.append_many([event])

    def append_many(self, events: Iterable[BaseEvent | dict[str, Any] | str]) -> int:
        """Validate every event first (a bad event rejects the batch); return once all are on disk."""
        return self._submit([encode_line(e)[0] for e in events])

    def append_lines(self, lines: Iterable[bytes]) -> int:
        """Write pre-validated canonical lines (bulk loaders that validated already), durably."""
        return self._submit([ln.rstrip(NL_BYTES) for ln in lines])

    def _submit(self, lines: list[bytes]) -> int:
        """Group commit: queue the lines; the first caller without a leader commits the whole queue."""
        me = _Commit(lines)
        with self._cv:
            if self._closed:
                raise EventLogError(f"event log {self.uri} is closed")
            if not lines:
                return 0
            self._queue.append(me)
            while self._leader and not me.done:
                self._cv.wait()
            group: list[_Commit] = []
            if not me.done:
                self._leader = True
                group, self._queue = self._queue, []
        if group:
            error: BaseException | None = None
            try:
                self._commit([ln for c in group for ln in c.lines])
            except BaseException as e:  # every caller of the group must hear of it
                error = e
            finally:
                with self._cv:
                    for c in group:
                        c.done, c.error = True, error
                    self._leader = False
                    self._cv.notify_all()
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt, SystemExit: the leader's own
        if me.error is not None:
            if isinstance(me.error, EventLogError):
                raise EventLogError(str(me.error)) from None  # one exception object per caller thread
            raise EventLogError(f"event log {self.uri}: append failed: {me.error!r}") from me.error
        return len(lines)

    def _commit(self, lines: list[bytes]) -> None:
        with self._lock:
            try:
                if self._torn:
                    self._repair()
                i = 0
                while i < len(lines):
                    if self._fh is not None and self._count >= self.rotate_events:
                        self._seal()
                    if self._fh is None:
                        self._open()
                    chunk = lines[i: i + self.rotate_events - self._count]
                    i += len(chunk)
                    self._write_all(self._encode(chunk))
                self._sync()
                self.commits += 1
            except OSError as e:
                self.failed_commits += 1
                self._rollback()
                raise EventLogError(f"event log {self.uri}: cannot write ({_why(e)}); {len(lines)} events "
                                    f"not accepted, retry") from None
            if self._count >= self.rotate_events:  # durable already: a failed seal is retried by the rotate thread
                self._try_seal()

    def _encode(self, events: list[bytes]) -> bytes:
        """Events go onto the current bundle line (RS between them); a full bundle gets its newline."""
        out: list[bytes] = []
        for ev in events:
            if self._in_bundle:
                out.append(RS_BYTES)
            out.append(ev)
            self._in_bundle += 1
            self._count += 1
            if self._in_bundle >= self.bundle_events:
                out.append(NL_BYTES)
                self._in_bundle = 0
        return b"".join(out)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fh.fileno(), view)
            self._size += n
            view = view[n:]

    def _sync(self) -> None:
        if self._fh is None:
            return
        if self.fsync:
            os.fsync(self._fh.fileno())
        self._good = (self._size, self._in_bundle, self._count)

    def _rollback(self) -> None:
        """Cut the current file back to its last durable state (never a torn line left behind)."""
        if self._fh is None:
            return
        try:
            self._repair()
        except OSError as e:
            self._torn = True  # retried before the next write and by the rotate thread
            log.warning("event log %s: could not truncate %s after a failed write (%s): retrying",
                        self.uri, self._path, _why(e))

    def _repair(self) -> None:
        size, in_bundle, count = self._good
        os.ftruncate(self._fh.fileno(), size)
        self._size, self._in_bundle, self._count = size, in_bundle, count
        self._torn = False

    def flush(self) -> None:
        """Seal the current segment now: visible to readers on return."""
        with self._lock:
            try:
                self._seal_or_rollback()
            except OSError as e:
                raise EventLogError(f"event log {self.uri}: cannot seal the current segment ({_why(e)}); "
                                    "its events are durable and are sealed on a later attempt") from None

    def sync(self) -> None:
        """Every append is durable when it returns; kept for callers that want to say so."""
        with self._lock:
            if self._fh is not None and not self._torn:
                os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Let queued appends finish, stop the rotate thread, seal. A seal that fails leaves a durable
        in-progress file, which the next writer (or ``recover``) seals."""
        with self._cv:
            self._closed = True
            while self._leader or self._queue:
                self._cv.wait()
        self._stop.set()
        if self._ticker.is_alive() and self._ticker is not threading.current_thread():
            self._ticker.join(timeout=30)
        with self._lock:
            try:
                if self._torn:
                    self._repair()
                self._seal()
            except OSError as e:
                log.warning("event log %s: could not seal %s on close (%s); sealed by the next writer",
                            self.uri, self._path, _why(e))
            if self._fh is not None:
                self._fh.close()  # releases the flock: an orphan now
                self._fh = None

    def reader(self) -> "FileEventReader":
        return FileEventReader(self.root)

    def _open(self) -> None:
        """A new in-progress file, created exclusively and locked. A recoverer may see it between
        create and lock and delete it as an empty orphan: then it is not ours, try another name."""
        while True:
            self._seq += 1
            path = self.inprogress / f"{self.writer_id}-{self._seq:08d}{SEGMENT_SUFFIX}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except (BlockingIOError, FileNotFoundError):
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            if self.fsync:
                _fsync_dir(self.inprogress)  # the file's name survives a power loss, like its data
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fh = os.fdopen(fd, "ab", buffering=0)
        self._path = path
        self._size = self._in_bundle = self._count = 0
        self._good = (0, 0, 0)
        self._torn = False
        self._opened = time.monotonic()

    def _seal(self) -> None:
        """Terminate the last line, fsync, rename into ``segments/``. Raises OSError with the file
        still open and consistent (the caller rolls back and retries later)."""
        if self._fh is None:
            return
        if self._count == 0:  # nothing in it (a failed first write was cut back): drop it
            self._fh.close()
            assert self._path is not None
            self._path.unlink(missing_ok=True)
            self._fh, self._path = None, None
            return
        if self._in_bundle:
            self._write_all(NL_BYTES)
            self._in_bundle = 0
        if self.fsync:
            os.fsync(self._fh.fileno())
        self._good = (self._size, 0, self._count)
        assert self._path is not None
        # Rename while still holding the flock, so recovery never races with us.
        name = _publish(self._path, self.segments)
        fh, self._fh, self._path = self._fh, None, None
        try:
            fh.close()
        except OSError:
            pass
        if self.fsync:
            try:
                _fsync_dir(self.segments)
            except OSError as e:  # the rename is atomic: after a power loss the file is under either name
                log.warning("event log %s: fsync of %s after sealing %s failed: %s", self.uri, self.segments, name,
                            _why(e))

    def _seal_or_rollback(self) -> None:
        """Seal now (under ``_lock``); on a disk error put the file back as it was and raise the OSError."""
        try:
            if self._torn:
                self._repair()
            self._seal()
        except OSError:
            self._rollback()
            raise

    def _try_seal(self) -> bool:
        """Seal now (under ``_lock``); on a disk error keep the file consistent and report False."""
        try:
            self._seal_or_rollback()
        except OSError as e:
            if not self._failing:
                log.warning("event log %s: cannot seal %s (%s): retrying", self.uri, self._path, _why(e))
            self._failing = True
            return False
        if self._failing:
            log.info("event log %s: sealing works again", self.uri)
        self._failing = False
        return True

    def _tick(self) -> None:
        """Seal by age (and retry failed seals); every ``orphan_seal_ms`` seal dead writers' files.
        Nothing here may end the thread: a disk error is retried on the next tick."""
        period = max(min(self.rotate_s / 4, 0.25), 0.02)
        next_sweep = time.monotonic() + self.orphan_seal_s
        while not self._stop.wait(period):
            try:
                with self._lock:
                    if self._fh is not None and (self._torn or self._count >= self.rotate_events
                                                 or time.monotonic() - self._opened >= self.rotate_s):
                        self._try_seal()
                if time.monotonic() >= next_sweep:
                    self.recover()
                    next_sweep = time.monotonic() + self.orphan_seal_s
            except Exception:  # noqa: BLE001 - the thread must survive anything
                log.exception("event log %s: rotate thread error (retrying)", self.uri)

    def recover(self) -> int:
        """Seal in-progress files whose writer is gone (its flock is free). Returns how many.
        A file that cannot be sealed now (disk full...) is left consistent and tried again later."""
        n = 0
        for p in sorted(self.inprogress.glob(f"*{SEGMENT_SUFFIX}")):
            try:
                n += _seal_orphan(p, self.segments)
            except OSError as e:
                log.warning("event log %s: cannot seal orphan %s yet (%s)", self.uri, p.name, _why(e))
        return n


def _seal_orphan(p: Path, segments: Path) -> int:
    """Seal one dead writer's file: keep its complete events, terminate its last line. 1 if sealed."""
    try:
        fh = open(p, "r+b")
    except FileNotFoundError:
        return 0
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # a live writer owns it
        if not p.exists():
            return 0  # sealed by its owner between glob and lock
        data = fh.read()
        keep = _complete_prefix(data)  # drop a torn last event
        if keep == 0:
            p.unlink(missing_ok=True)
            return 0
        if keep < len(data):
            fh.truncate(keep)
        fh.seek(keep)
        if not data[:keep].endswith(NL_BYTES):
            fh.write(NL_BYTES)  # the writer died mid-bundle: terminate its line
        fh.flush()
        os.fsync(fh.fileno())
        _publish(p, segments)
        _fsync_dir(segments)
        return 1


def _why(e: OSError) -> str:
    return f"[Errno {e.errno}] {e.strerror}" if e.errno else str(e)


def _complete_prefix(data: bytes) -> int:
    """Length of ``data`` up to its last complete event. Events end at a newline or an RS; of the
    unterminated tail, a leading whole JSON value is kept (a torn object never is one)."""
    import json

    cut = max(data.rfind(NL_BYTES), data.rfind(RS_BYTES)) + 1
    tail = data[cut:].decode("utf-8", errors="replace")
    if tail.strip():
        try:
            _, end = json.JSONDecoder().raw_decode(tail)
            return cut + len(tail[:end].encode())
        except ValueError:
            pass
    return cut


def _fsync_dir(d: Path) -> None:
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _publish(path: Path, segments: Path) -> str:
    """Atomically move a finished in-progress file into the segment directory; its new name."""
    name = f"{int(time.time() * 1000):013d}-{path.name}"
    os.rename(path, segments / name)
    return name


class FileEventReader:
    """Reads sealed segments in name (≈ time) order, each once; follows new ones. An event that is
    not UTF-8 (a corrupted byte) is skipped and counted in ``skipped``; it never stops the reader."""

    def __init__(self, root: str | Path):
        self.segments = Path(root) / SEGMENTS_DIR
        self._done: set[str] = set()
        self._pending: list[str] = []
        self.skipped = 0

    def poll(self, max_records: int = 10_000, timeout: float = 1.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            if not self._pending:
                for p in sorted(self.segments.glob(f"*{SEGMENT_SUFFIX}")):
                    if p.name not in self._done:
                        self._done.add(p.name)
                        self._pending.extend(self._events(p.read_bytes()))
            if self._pending or time.monotonic() >= deadline:
                out, self._pending = self._pending[:max_records], self._pending[max_records:]
                return out
            time.sleep(0.05)

    def _events(self, data: bytes) -> list[str]:
        out: list[str] = []
        for line in data.split(NL_BYTES):  # not splitlines(): it splits at RS too
            for raw in line.split(RS_BYTES):  # JSON escapes every control character: RS only ever separates
                if not raw:
                    continue
                try:
                    out.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    self.skipped += 1
        return out

    def close(self) -> None:
        self._pending.clear()


# --------------------------------------------------------------------------- kafka://
