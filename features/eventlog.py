"""The event log: one interface, two backends chosen by URI.

``file://<dir>`` is the embedded default: each writer appends JSON lines to its own
in-progress file under ``<dir>/.inprogress`` and, at most every ``rotate_ms`` or
``rotate_events``, seals it — fsync, then an atomic rename into ``<dir>/segments``.
A segment therefore appears complete or not at all, which is exactly what Flink's
FileSource in continuous-monitoring mode needs to read every event once. Writers hold
an ``flock`` on their in-progress file; a writer that finds an unlocked one (its owner
died) seals it, so nothing accepted is lost across crashes.

Segment lines are *bundles*: up to ``bundle_events`` JSON events separated by the ASCII
record separator (RS, 0x1e, as in RFC 7464 JSON text sequences), a newline after every
bundle. A Flink record is one line, so the feature job pays its per-record cost (~30 us
per Python operator hop, measured) once per bundle rather than once per event: at
``bundle_events = 1`` the file is plain JSON lines. :func:`split_bundle` is the one
place that reads a bundle; readers and jobs return single events.

``kafka://host:port/topic`` is production: an idempotent confluent-kafka producer with
``acks=all``, keyed by user id, one event per message. Both backends carry byte-identical
JSON events.
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
from typing import Any, Protocol
from urllib.parse import urlparse

from features.events import BaseEvent, coerce_event

SEGMENT_SUFFIX = ".jsonl"
SEGMENTS_DIR = "segments"
INPROGRESS_DIR = ".inprogress"
RS = "\x1e"  # separates the events of one bundle line
_RS, _NL = RS.encode(), b"\n"


def split_bundle(line: str) -> list[str]:
    """The events of one segment line (a bundle), or of one Kafka message (one event)."""
    if RS not in line:
        return [line] if line else []
    return [p for p in line.split(RS) if p]


class EventLogError(RuntimeError):
    """The log could not accept or deliver events (broker down, disk full...)."""


class EventReader(Protocol):
    def poll(self, max_records: int = 10_000, timeout: float = 1.0) -> list[str]: ...
    def close(self) -> None: ...


class EventLog(Protocol):
    """Append validated events; ``flush`` makes everything appended durable and readable."""

    uri: str

    def append(self, event: BaseEvent | dict[str, Any] | str) -> None: ...
    def append_many(self, events: Iterable[BaseEvent | dict[str, Any] | str]) -> int: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def reader(self) -> EventReader: ...


def _line(event: BaseEvent | dict[str, Any] | str) -> tuple[bytes, int]:
    ev = coerce_event(event)
    return ev.to_json().encode(), ev.partition_key


def read_all(reader: EventReader, expect: int | None = None, idle_s: float = 2.0, max_s: float = 120.0) -> list[str]:
    """Drain a reader: stop at ``expect`` lines, or after ``idle_s`` without new lines."""
    out: list[str] = []
    t_end = time.monotonic() + max_s
    last = time.monotonic()
    while time.monotonic() < t_end:
        got = reader.poll(10_000, timeout=0.2)
        if got:
            out.extend(got)
            last = time.monotonic()
            if expect is not None and len(out) >= expect:
                break
        elif time.monotonic() - last > idle_s:
            break
    return out


# --------------------------------------------------------------------------- file://


class FileEventLog:
    """Append-only segment log in a local directory (see module docstring)."""

    def __init__(self, root: str | Path, rotate_ms: int = 500, rotate_events: int = 20_000, fsync: bool = True,
                 bundle_events: int = 1024):
        self.root = Path(root)
        self.uri = "file://" + str(self.root)
        self.segments = self.root / SEGMENTS_DIR
        self.inprogress = self.root / INPROGRESS_DIR
        self.segments.mkdir(parents=True, exist_ok=True)
        self.inprogress.mkdir(parents=True, exist_ok=True)
        self.rotate_s = rotate_ms / 1000.0
        self.rotate_events = rotate_events
        self.fsync = fsync
        self.bundle_events = max(1, bundle_events)
        self._in_bundle = 0  # events on the current, unterminated line
        self.writer_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._lock = threading.Lock()
        self._seq = 0
        self._fh: Any = None
        self._path: Path | None = None
        self._count = 0
        self._opened = 0.0
        self._closed = False
        self.recover()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="eventlog-rotate", daemon=True)
        self._ticker.start()

    # -- writing
    def append(self, event: BaseEvent | dict[str, Any] | str) -> None:
        self.append_many([event])

    def append_many(self, events: Iterable[BaseEvent | dict[str, Any] | str]) -> int:
        """Validate every event first; then write them all (a bad event rejects the batch)."""
        lines = [_line(e)[0] for e in events]
        with self._lock:
            if self._closed:
                raise EventLogError("event log is closed")
            self._write(lines)
        return len(lines)

    def append_lines(self, lines: Iterable[bytes]) -> int:
        """Write pre-validated canonical lines (bulk loaders that validated already)."""
        with self._lock:
            return self._write([ln.rstrip(_NL) for ln in lines])

    def _write(self, events: list[bytes]) -> int:
        """Events go onto the current bundle line (RS between them); a full bundle gets its newline.
        A crash can leave an unterminated last line: :meth:`recover` keeps its complete events."""
        for ev in events:
            if self._fh is None:
                self._open()
            if self._in_bundle:
                self._fh.write(_RS)
            self._fh.write(ev)
            self._in_bundle += 1
            self._count += 1
            if self._in_bundle >= self.bundle_events:
                self._fh.write(_NL)
                self._in_bundle = 0
            if self._count >= self.rotate_events:
                self._seal()
        return len(events)

    def flush(self) -> None:
        """Seal the current segment now: durable and visible to readers on return."""
        with self._lock:
            self._seal()

    def sync(self) -> None:
        """Make what was appended durable without sealing (recovered after a crash)."""
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._seal()
            self._closed = True

    def reader(self) -> "FileEventReader":
        return FileEventReader(self.root)

    def _open(self) -> None:
        self._seq += 1
        self._path = self.inprogress / f"{self.writer_id}-{self._seq:08d}{SEGMENT_SUFFIX}"
        self._fh = open(self._path, "ab", buffering=1 << 20)
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._count = 0
        self._opened = time.monotonic()

    def _seal(self) -> None:
        if self._fh is None:
            return
        fh, path = self._fh, self._path
        self._fh, self._path = None, None
        if self._in_bundle:
            fh.write(_NL)
            self._in_bundle = 0
        fh.flush()
        if self.fsync:
            os.fsync(fh.fileno())
        assert path is not None
        # Rename while still holding the lock, so recovery never races with us.
        _publish(path, self.segments, self.fsync)
        fh.close()

    def _tick(self) -> None:
        period = max(self.rotate_s / 4, 0.02)
        while not self._stop.wait(period):
            with self._lock:
                if self._fh is not None and time.monotonic() - self._opened >= self.rotate_s:
                    self._seal()

    def recover(self) -> int:
        """Seal in-progress files whose writer is gone (its flock is free). Returns how many."""
        n = 0
        for p in sorted(self.inprogress.glob(f"*{SEGMENT_SUFFIX}")):
            try:
                fh = open(p, "r+b")
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer owns it
                if not p.exists():
                    continue  # sealed by its owner between glob and lock
                data = fh.read()
                keep = _complete_prefix(data)  # drop a torn last event
                if keep == 0:
                    p.unlink(missing_ok=True)
                    continue
                if keep < len(data):
                    fh.truncate(keep)
                fh.seek(keep)
                if not data[:keep].endswith(_NL):
                    fh.write(_NL)  # the writer died mid-bundle: terminate its line
                fh.flush()
                os.fsync(fh.fileno())
                _publish(p, self.segments, True)
                n += 1
            finally:
                fh.close()
        return n


def _complete_prefix(data: bytes) -> int:
    """Length of ``data`` up to its last complete event. Events end at a newline or an RS; of the
    unterminated tail, a leading whole JSON value is kept (a torn object never is one)."""
    import json

    cut = max(data.rfind(_NL), data.rfind(_RS)) + 1
    tail = data[cut:].decode("utf-8", errors="replace")
    if tail.strip():
        try:
            _, end = json.JSONDecoder().raw_decode(tail)
            return cut + len(tail[:end].encode())
        except ValueError:
            pass
    return cut


def _publish(path: Path, segments: Path, fsync: bool) -> None:
    """Atomically move a finished in-progress file into the segment directory."""
    name = f"{int(time.time() * 1000):013d}-{path.name}"
    os.rename(path, segments / name)
    if fsync:
        dfd = os.open(segments, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class FileEventReader:
    """Reads sealed segments in name (≈ time) order, each once; follows new ones."""

    def __init__(self, root: str | Path):
        self.segments = Path(root) / SEGMENTS_DIR
        self._done: set[str] = set()
        self._pending: list[str] = []

    def poll(self, max_records: int = 10_000, timeout: float = 1.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            if not self._pending:
                for p in sorted(self.segments.glob(f"*{SEGMENT_SUFFIX}")):
                    if p.name not in self._done:
                        self._done.add(p.name)
                        for line in p.read_text().split("\n"):  # not splitlines(): it splits at RS too
                            self._pending.extend(split_bundle(line))
            if self._pending or time.monotonic() >= deadline:
                out, self._pending = self._pending[:max_records], self._pending[max_records:]
                return out
            time.sleep(0.05)

    def close(self) -> None:
        self._pending.clear()


# --------------------------------------------------------------------------- kafka://


class KafkaEventLog:
    """Kafka backend: idempotent producer, acks=all, keyed by user id."""

    def __init__(self, uri: str, partitions: int = 8, create_topic: bool = True, timeout_s: float = 15.0):
        u = urlparse(uri)
        if not (u.hostname and u.port and u.path.strip("/")):
            raise EventLogError(f"kafka URI needs host, port and topic: {uri}")
        from confluent_kafka import Producer

        self.uri = uri
        self.bootstrap = f"{u.hostname}:{u.port}"
        self.topic = u.path.strip("/")
        self.timeout_s = timeout_s
        if create_topic:
            ensure_topic(self.bootstrap, self.topic, partitions, timeout_s)
        self._errors: list[str] = []
        self._producer = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "message.timeout.ms": int(timeout_s * 1000),
            }
        )

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def append(self, event: BaseEvent | dict[str, Any] | str) -> None:
        self.append_many([event])

    def append_many(self, events: Iterable[BaseEvent | dict[str, Any] | str]) -> int:
        prepared = [_line(e) for e in events]
        for ln, key in prepared:
            while True:
                try:
                    self._producer.produce(self.topic, value=ln, key=str(key).encode(), on_delivery=self._on_delivery)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    self._producer.poll(0.1)
            self._producer.poll(0)
        return len(prepared)

    def flush(self) -> None:
        left = self._producer.flush(self.timeout_s)
        if left:
            raise EventLogError(f"{left} events not acknowledged by {self.bootstrap} within {self.timeout_s}s")
        if self._errors:
            errs, self._errors = self._errors, []
            raise EventLogError(f"{len(errs)} events failed delivery: {errs[0]}")

    def close(self) -> None:
        self.flush()

    def reader(self) -> "KafkaEventReader":
        return KafkaEventReader(self.bootstrap, self.topic)


def ensure_topic(bootstrap: str, topic: str, partitions: int, timeout_s: float = 15.0) -> None:
    """Create the topic if it does not exist."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        md = admin.list_topics(timeout=timeout_s)
    except KafkaException as e:
        raise EventLogError(f"Kafka broker at {bootstrap} unreachable: {e}") from None
    if topic in md.topics:
        return
    fut = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic]
    try:
        fut.result(timeout_s)
    except KafkaException as e:
        if "TOPIC_ALREADY_EXISTS" not in str(e):
            raise EventLogError(f"could not create topic {topic}: {e}") from None


class KafkaEventReader:
    """Reads every partition from the beginning (no consumer group: tools and tests)."""

    def __init__(self, bootstrap: str, topic: str):
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self._c = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"feedrank-reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        md = self._c.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        self._c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])

    def poll(self, max_records: int = 10_000, timeout: float = 1.0) -> list[str]:
        out = []
        for m in self._c.consume(min(max_records, 100_000), timeout):
            if m.error():
                continue  # partition EOF and transient errors
            out.append(m.value().decode())
        return out

    def close(self) -> None:
        self._c.close()


# --------------------------------------------------------------------------- factory


def open_event_log(uri: str, **opts: Any) -> FileEventLog | KafkaEventLog:
    """Open the backend for ``file://<dir>`` or ``kafka://host:port/topic``."""
    if uri.startswith("file://"):
        allowed = {k: opts[k] for k in ("rotate_ms", "rotate_events", "fsync", "bundle_events") if k in opts}
        return FileEventLog(uri[len("file://"):], **allowed)
    if uri.startswith("kafka://"):
        allowed = {k: opts[k] for k in ("partitions", "create_topic", "timeout_s") if k in opts}
        return KafkaEventLog(uri, **allowed)
    raise EventLogError(f"unsupported event log URI {uri!r}: use file://<dir> or kafka://host:port/topic")


def open_configured_event_log(cfg: Any) -> FileEventLog | KafkaEventLog:
    """The event log named by the configuration."""
    return open_event_log(
        cfg.resolve_uri(cfg.events.uri),
        rotate_ms=cfg.events.rotate_ms,
        rotate_events=cfg.events.rotate_events,
        fsync=cfg.events.fsync,
        bundle_events=cfg.events.bundle_events,
        partitions=cfg.events.kafka_partitions,
    )
