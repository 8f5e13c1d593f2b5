"""The ``kafka://host:port/topic`` event log, production: an idempotent confluent-kafka producer with
``acks=all``; a message is a bundle of one partition's events (:mod:`features.eventlog`; partition =
user id % partitions), and an append returns once the broker acknowledged it. Both backends
carry byte-identical JSON events.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlparse

from core.events import BaseEvent, coerce_event
from features.eventlog import RS_BYTES, EventLogError, split_bundle

#: librdkafka's own log lines (connection refused while a broker restarts...) go to Python logging,
#: not raw to stderr
KAFKA_LOG = logging.getLogger("feedrank.kafka")


class KafkaEventLog:
    """Kafka backend: one bundle per message, partitioned by user id, acknowledged before it returns.

    ``append_many`` groups its events by partition (``partition_key % partitions``, so one user's
    events keep their order) and sends each group as bundles of up to ``bundle_events`` events
    (the segment log's line format), each message stamped with its latest event time (what the
    jobs' per-partition watermarks read). It returns only when the broker has acknowledged every
    message (idempotent producer, ``acks=all``) and raises :class:`EventLogError` when any was
    not within ``timeout_s``: an event is accepted once it is in the topic, never before.
    """

    def __init__(self, uri: str, partitions: int = 8, create_topic: bool = True, timeout_s: float = 10.0,
                 bundle_events: int = 1024, replication_factor: int = 1, linger_ms: int = 2, retention_ms: int = -1):
        u = urlparse(uri)
        if not (u.hostname and u.port and u.path.strip("/")):
            raise EventLogError(f"kafka URI needs host, port and topic: {uri}")
        from confluent_kafka import Producer

        self.uri = uri
        self.bootstrap = f"{u.hostname}:{u.port}"
        self.topic = u.path.strip("/")
        self.timeout_s = timeout_s
        self.bundle_events = max(1, bundle_events)
        if create_topic:
            ensure_topic(self.bootstrap, self.topic, partitions, timeout_s, replication_factor, retention_ms)
        self.partitions = topic_partitions(self.bootstrap, self.topic, timeout_s)
        self._producer = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": linger_ms,
                "message.max.bytes": 8 << 20,  # a bundle of 1024 events is ~0.3-1 MB
                "message.timeout.ms": int(timeout_s * 1000),
            },
            logger=KAFKA_LOG,
        )

    def append(self, event: BaseEvent | dict[str, Any] | str) -> None:
        self.append_many([event])

    def append_many(self, events: Iterable[BaseEvent | dict[str, Any] | str]) -> int:
        """Validate all, send them as bundles, wait for the broker's acknowledgement of each."""
        by_part: dict[int, list[BaseEvent]] = {}
        for e in events:
            ev = coerce_event(e)
            by_part.setdefault(ev.partition_key % self.partitions, []).append(ev)
        n = sum(len(v) for v in by_part.values())
        if not n:
            return 0
        pending = _Deliveries()
        deadline = time.monotonic() + self.timeout_s
        for part, evs in by_part.items():
            for i in range(0, len(evs), self.bundle_events):
                chunk = evs[i: i + self.bundle_events]
                value = RS_BYTES.join(ev.to_json().encode() for ev in chunk)
                ts = max(ev.ts for ev in chunk)
                pending.sent += 1
                while True:
                    try:
                        self._producer.produce(self.topic, value=value, key=str(part).encode(), partition=part,
                                               timestamp=ts, on_delivery=pending.on_delivery)
                        break
                    except BufferError:  # local queue full: let deliveries drain
                        if time.monotonic() > deadline:
                            raise EventLogError(f"Kafka producer queue full for {self.timeout_s}s "
                                                f"({self.bootstrap})") from None
                        self._producer.poll(0.05)
        while not pending.done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise EventLogError(f"{pending.sent - pending.acked} of {pending.sent} messages not acknowledged "
                                    f"by {self.bootstrap} within {self.timeout_s}s")
            self._producer.poll(min(left, 0.05))
        if pending.errors:
            raise EventLogError(f"{len(pending.errors)} of {pending.sent} messages failed delivery to "
                                f"{self.bootstrap}: {pending.errors[0]}")
        return n

    def flush(self) -> None:
        """Every append has been acknowledged when it returned: nothing is waiting here."""
        self._producer.flush(self.timeout_s)

    def close(self) -> None:
        self.flush()

    def reader(self) -> "KafkaEventReader":
        return KafkaEventReader(self.bootstrap, self.topic)


class _Deliveries:
    """Delivery reports of one append (librdkafka calls back from whichever thread polls)."""

    def __init__(self) -> None:
        self.sent = self.acked = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def on_delivery(self, err: Any, msg: Any) -> None:
        with self._lock:
            self.acked += 1
            if err is not None:
                self.errors.append(str(err))

    def done(self) -> bool:
        return self.acked >= self.sent


def ensure_topic(bootstrap: str, topic: str, partitions: int, timeout_s: float = 15.0,
                 replication_factor: int = 1, retention_ms: int = -1) -> None:
    """Create the topic if it does not exist. ``retention_ms`` -1 keeps every event: time retention
    reads message timestamps, which are event times (a replayed history would be deleted)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap}, logger=KAFKA_LOG)
    try:
        md = admin.list_topics(timeout=timeout_s)
    except KafkaException as e:
        raise EventLogError(f"Kafka broker at {bootstrap} unreachable: {e}") from None
    if topic in md.topics:
        return
    new = NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor,
                   config={"max.message.bytes": str(8 << 20), "retention.ms": str(retention_ms)})
    fut = admin.create_topics([new])[topic]
    try:
        fut.result(timeout_s)
    except KafkaException as e:
        if "TOPIC_ALREADY_EXISTS" not in str(e):
            raise EventLogError(f"could not create topic {topic}: {e}") from None


def topic_partitions(bootstrap: str, topic: str, timeout_s: float = 15.0) -> int:
    """How many partitions the topic has (it may have been created elsewhere with another count)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            md = AdminClient({"bootstrap.servers": bootstrap}, logger=KAFKA_LOG).list_topics(topic, timeout=timeout_s)
        except KafkaException as e:
            raise EventLogError(f"Kafka broker at {bootstrap} unreachable: {e}") from None
        t = md.topics.get(topic)
        if t is not None and t.error is None and t.partitions:
            return len(t.partitions)
        if time.monotonic() > deadline:
            raise EventLogError(f"topic {topic} has no partitions at {bootstrap}")
        time.sleep(0.2)  # just created: metadata still propagating


def topic_offsets(uri: str, groups: Iterable[str] = (), timeout_s: float = 10.0) -> dict[str, Any]:
    """Messages per partition of a kafka:// log (end offsets) and each consumer group's committed
    offsets and lag: how far the Flink jobs have read, as Kafka itself records it."""
    from confluent_kafka import Consumer, TopicPartition

    u = urlparse(uri)
    bootstrap, topic = f"{u.hostname}:{u.port}", u.path.strip("/")
    n = topic_partitions(bootstrap, topic, timeout_s)
    parts = [TopicPartition(topic, p) for p in range(n)]
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"feedrank-offsets-{uuid.uuid4().hex[:8]}"},
                 logger=KAFKA_LOG)
    try:
        end = [c.get_watermark_offsets(tp, timeout=timeout_s)[1] for tp in parts]
    finally:
        c.close()
    out: dict[str, Any] = {"topic": topic, "partitions": n, "messages": sum(end), "end_offsets": end, "groups": {}}
    for g in groups:
        gc = Consumer({"bootstrap.servers": bootstrap, "group.id": g, "enable.auto.commit": False}, logger=KAFKA_LOG)
        try:
            committed = [max(tp.offset, 0) for tp in gc.committed(parts, timeout=timeout_s)]
        finally:
            gc.close()
        out["groups"][g] = {"committed": sum(committed), "lag": sum(e - c for e, c in zip(end, committed))}
    return out


class KafkaEventReader:
    """Reads every partition from the beginning (no consumer group: tools and tests); returns single events."""

    def __init__(self, bootstrap: str, topic: str):
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self._c = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"feedrank-reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            },
            logger=KAFKA_LOG,
        )
        md = self._c.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        self._c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])

    def poll(self, max_records: int = 10_000, timeout: float = 1.0) -> list[str]:
        out: list[str] = []
        for m in self._c.consume(min(max_records, 100_000), timeout):
            if m.error():
                continue  # partition EOF and transient errors
            out.extend(split_bundle(m.value().decode()))
        return out

    def close(self) -> None:
        self._c.close()
