"""Flink sources for the event log, chosen by the configured URI.

``file://`` -> FileSource over the sealed segment directory in continuous-monitoring
mode (each sealed segment is read exactly once: the enumerator remembers every path it
has assigned and segments are renamed into place complete). ``kafka://`` -> KafkaSource,
which needs the Flink Kafka connector jar; without one the job stops with what is
missing and how to configure it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from feedrank.config import Config
from features.eventlog import SEGMENTS_DIR


class MissingConnector(RuntimeError):
    """The Kafka connector jar is not configured or not found."""


def kafka_connector_jar(cfg: Config) -> Path:
    jar = cfg.events.flink_connector_jar
    if not jar:
        raise MissingConnector(
            "events.uri is kafka:// but no Flink Kafka connector jar is configured: download "
            "flink-sql-connector-kafka-<version>.jar matching Flink 2.x and set "
            "FEEDRANK_EVENTS_FLINK_CONNECTOR_JAR=/path/to/it (or events.flink_connector_jar), "
            "or use the local segment log (FEEDRANK_EVENTS=file://var/events)"
        )
    p = cfg.path(jar)
    if not p.is_file():
        raise MissingConnector(f"events.flink_connector_jar={jar} does not exist")
    return p


def event_lines(env: Any, cfg: Config, name: str = "events") -> Any:
    """A DataStream[str] of single JSON events (bundles split: see :func:`event_records`)."""
    from pyflink.common import Types

    from features.eventlog import split_bundle

    uri = cfg.resolve_uri(cfg.events.uri)
    records = event_records(env, cfg, name)
    if not uri.startswith("file://"):
        return records  # Kafka: one event per message
    return records.flat_map(split_bundle, output_type=Types.STRING()).name(f"{name}-split")


def event_records(env: Any, cfg: Config, name: str = "events") -> Any:
    """A DataStream[str] of the log's records: segment lines, each a bundle of up to
    ``events.bundle_events`` RS-separated events (file://), or one event per message (kafka://).
    Jobs that process bundles whole pay PyFlink's per-record cost once per bundle."""
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
        return env.from_source(src, WatermarkStrategy.no_watermarks(), name)
    jar = kafka_connector_jar(cfg)
    env.add_jars(jar.as_uri())
    from pyflink.common.serialization import SimpleStringSchema
    from pyflink.datastream.connectors.kafka import KafkaOffsetsInitializer, KafkaSource

    u = urlparse(uri)
    src = (
        KafkaSource.builder()
        .set_bootstrap_servers(f"{u.hostname}:{u.port}")
        .set_topics(u.path.strip("/"))
        .set_group_id(f"feedrank-{name}")
        .set_starting_offsets(KafkaOffsetsInitializer.earliest())
        .set_value_only_deserializer(SimpleStringSchema())
        .build()
    )
    return env.from_source(src, WatermarkStrategy.no_watermarks(), name).map(lambda s: s, output_type=Types.STRING())
