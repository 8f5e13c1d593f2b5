"""Flink sources for the event log, chosen by the configured URI.

``kafka://`` -> Flink's KafkaSource (the connector jar fetched from Maven Central into
``jvm.dir``, or ``events.flink_connector_jar``), with per-partition event-time watermarks.
``file://`` -> FileSource over the sealed segment directory in continuous-monitoring mode
(each sealed segment is read exactly once: the enumerator remembers every path it has
assigned and segments are renamed into place complete).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from core.config import Config
from features.eventlog_file import SEGMENTS_DIR


class MissingConnector(RuntimeError):
    """The Kafka connector jar is not configured, not fetched, or not found."""


def kafka_connector_jar(cfg: Config) -> Path:
    """``events.flink_connector_jar`` when set, else the connector fetched into ``jvm.dir`` (fetched now if absent)."""
    jar = cfg.events.flink_connector_jar
    if jar:
        p = cfg.path(jar)
        if not p.is_file():
            raise MissingConnector(f"events.flink_connector_jar={jar} does not exist")
        return p
    from core import jvm

    try:
        return jvm.jar(cfg, "flink-sql-connector-kafka")
    except jvm.JvmArtifactsMissing as e:
        raise MissingConnector(f"events.uri is kafka:// and the Flink Kafka connector is not available: {e} "
                               "(or set events.flink_connector_jar, or use FEEDRANK_EVENTS=file://var/events)") from None


def source_watermarks(cfg: Config) -> bool:
    """Whether :func:`event_records` already carries event-time watermarks (per Kafka partition);
    a file:// stream gets them from the job, after parsing."""
    return cfg.resolve_uri(cfg.events.uri).startswith("kafka://")


def event_lines(env: Any, cfg: Config, name: str = "events", job: str = "events") -> Any:
    """A DataStream[str] of single JSON events (bundles split: see :func:`event_records`)."""
    from pyflink.common import Types

    from features.eventlog import split_bundle

    return event_records(env, cfg, name, job).flat_map(split_bundle, output_type=Types.STRING()).name(f"{name}-split")


def kafka_group(job: str) -> str:
    """The consumer group a job's KafkaSource commits its offsets to (what Kafka's lag tools show)."""
    return f"feedrank-{job}"


def event_records(env: Any, cfg: Config, name: str = "events", job: str = "events") -> Any:
    """A DataStream[str] of the log's records: bundles of up to ``events.bundle_events``
    RS-separated events, a segment line (file://) or a message (kafka://). Jobs that process
    bundles whole pay PyFlink's per-record cost once per bundle.

    kafka://: Flink's KafkaSource from the earliest offset (a restored checkpoint's offsets win),
    offsets committed to the group ``feedrank-<job>`` on every checkpoint (for lag monitoring),
    and watermarks per partition from the message timestamps (each bundle's latest event time:
    ``features.eventlog_kafka.KafkaEventLog``), bounded by ``streaming.out_of_orderness_ms``. Idle
    partitions hold the watermark back unless ``events.kafka_source_idle_ms`` > 0.
    """
    from pyflink.common import Duration, Types, WatermarkStrategy

    uri = cfg.resolve_uri(cfg.events.uri)
    if uri.startswith("file://"):
        from pyflink.datastream.connectors.file_system import FileSource, StreamFormat

        seg = Path(uri[len("file://"):]) / SEGMENTS_DIR
        seg.mkdir(parents=True, exist_ok=True)
        src = (
            FileSource.for_record_stream_format(StreamFormat.text_line_format(), str(seg))
            .monitor_continuously(Duration.of_millis(cfg.flink.file_monitor_interval_ms))
            .build()
        )
        return env.from_source(src, WatermarkStrategy.no_watermarks(), name).uid(f"{name}-file-source")
    env.add_jars(kafka_connector_jar(cfg).as_uri())
    from pyflink.common.serialization import SimpleStringSchema
    from pyflink.datastream.connectors.kafka import KafkaOffsetsInitializer, KafkaSource

    u = urlparse(uri)
    src = (
        KafkaSource.builder()
        .set_bootstrap_servers(f"{u.hostname}:{u.port}")
        .set_topics(u.path.strip("/"))
        .set_group_id(kafka_group(job))
        .set_starting_offsets(KafkaOffsetsInitializer.earliest())
        .set_value_only_deserializer(SimpleStringSchema())
        .set_property("commit.offsets.on.checkpoint", "true")
        .set_property("partition.discovery.interval.ms", "60000")
        .build()
    )
    wm = WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_millis(cfg.streaming.out_of_orderness_ms))
    if cfg.events.kafka_source_idle_ms:
        wm = wm.with_idleness(Duration.of_millis(cfg.events.kafka_source_idle_ms))
    return (env.from_source(src, wm, name).uid(f"{name}-kafka-source")
            .map(lambda s: s, output_type=Types.STRING()).name(f"{name}-records").uid(f"{name}-records"))
