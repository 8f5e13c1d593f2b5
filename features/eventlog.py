"""The event log: one interface, two backends chosen by URI (:func:`open_event_log`):
``file://<dir>`` segments (:mod:`features.eventlog_file`, the embedded default) and
``kafka://host:port/topic`` (:mod:`features.eventlog_kafka`, production). Both carry byte-identical
JSON events.

Lines (segment lines, Kafka messages) are *bundles*: up to ``bundle_events`` JSON events separated
by the ASCII record separator (RS, 0x1e, as in RFC 7464 JSON text sequences). A Flink record is
one line, so the feature job pays its per-record cost (~30 us per Python operator hop, measured)
once per bundle rather than once per event: at ``bundle_events = 1`` a line is one plain JSON
event. :func:`split_bundle` is the one place that reads a bundle; readers and jobs return single
events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from core.events import BaseEvent, coerce_event

if TYPE_CHECKING:
    from features.eventlog_file import FileEventLog
    from features.eventlog_kafka import KafkaEventLog

log = logging.getLogger("feedrank.eventlog")

RS = "\x1e"  # separates the events of one bundle line
RS_BYTES, NL_BYTES = RS.encode(), b"\n"


def split_bundle(line: str) -> list[str]:
    """The events of one segment line or Kafka message (a bundle; a lone event has no RS)."""
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


def encode_line(event: BaseEvent | dict[str, Any] | str) -> tuple[bytes, int]:
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


# --------------------------------------------------------------------------- factory


def open_event_log(uri: str, **opts: Any) -> "FileEventLog | KafkaEventLog":
    """Open the backend for ``file://<dir>`` or ``kafka://host:port/topic``."""
    from features.eventlog_file import FileEventLog
    from features.eventlog_kafka import KafkaEventLog

    if uri.startswith("file://"):
        allowed = {k: opts[k] for k in ("rotate_ms", "rotate_events", "fsync", "bundle_events", "orphan_seal_ms")
                   if k in opts}
        return FileEventLog(uri[len("file://"):], **allowed)
    if uri.startswith("kafka://"):
        allowed = {k: opts[k] for k in ("partitions", "create_topic", "timeout_s", "bundle_events",
                                        "replication_factor", "linger_ms", "retention_ms") if k in opts}
        return KafkaEventLog(uri, **allowed)
    raise EventLogError(f"unsupported event log URI {uri!r}: use file://<dir> or kafka://host:port/topic")


def open_configured_event_log(cfg: Any) -> "FileEventLog | KafkaEventLog":
    """The event log named by the configuration."""
    return open_event_log(
        cfg.resolve_uri(cfg.events.uri),
        rotate_ms=cfg.events.rotate_ms,
        rotate_events=cfg.events.rotate_events,
        fsync=cfg.events.fsync,
        bundle_events=cfg.events.bundle_events,
        orphan_seal_ms=cfg.events.orphan_seal_ms,
        partitions=cfg.events.kafka_partitions,
        replication_factor=cfg.events.kafka_replication_factor,
        timeout_s=cfg.events.kafka_delivery_timeout_ms / 1000,
        linger_ms=cfg.events.kafka_linger_ms,
        retention_ms=cfg.events.kafka_retention_ms,
    )
