"""A single-node Apache Kafka broker in KRaft mode (broker and controller in one JVM) from the
jars ``core/jvm/pom.xml`` declares.

Storage lives in ``<data_dir>/kafka/data`` and is formatted once (``kafka.tools.StorageTool
format``, as ``kafka-storage.sh`` does); the broker's own log goes to ``<data_dir>/log/kafka-server.log``.
The controller listens on ``kafka.controller_port`` (0: the broker port + 1), both on the
event log's loopback host. The console tools (``kafka-console-consumer`` and the like) run from
the same classpath: :func:`tool_argv`.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlparse

from core.config import Config
from core import jvm
from core.services import ServiceError
from runtime.procs import Service

#: main classes of the scripts in Kafka's bin/ that people reach for
TOOLS = {
    "kafka-console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
    "kafka-console-producer": "org.apache.kafka.tools.ConsoleProducer",
    "kafka-topics": "org.apache.kafka.tools.TopicCommand",
    "kafka-consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "kafka-storage": "kafka.tools.StorageTool",
}


def java_binary() -> str:
    from jobs.flinkenv import java_path, require_java

    require_java()
    found = shutil.which("java", path=java_path())
    assert found is not None  # require_java found it
    return found


def broker_address(cfg: Config) -> tuple[str, int, int]:
    """(host, broker port, controller port) of the configured kafka:// event log."""
    u = urlparse(cfg.events.uri)
    host, port = u.hostname or "127.0.0.1", u.port or 9092
    return host, port, cfg.kafka.controller_port or port + 1


def kafka_dir(cfg: Config) -> Path:
    return cfg.data_dir / "kafka"


def write_config(cfg: Config) -> Path:
    """server.properties and the broker's log4j2 file (rewritten on every start: ports may change)."""
    host, port, cport = broker_address(cfg)
    d = kafka_dir(cfg)
    (d / "data").mkdir(parents=True, exist_ok=True)
    log_dir = cfg.data_dir / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    k = cfg.kafka
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{cport}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(d / "data"),
        "num.partitions": str(cfg.events.kafka_partitions),
        "default.replication.factor": str(cfg.events.kafka_replication_factor),
        "min.insync.replicas": "1",
        # one broker: the internal topics cannot have more replicas than that
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "log.retention.hours": str(k.retention_hours),
        "auto.create.topics.enable": "false",  # topics are created with their partitions by `feedrank up`
    }
    (d / "server.properties").write_text("".join(f"{a}={b}\n" for a, b in props.items()))
    (d / "log4j2.properties").write_text(
        "status = warn\n"
        "appender.file.type = File\n"
        "appender.file.name = file\n"
        f"appender.file.fileName = {log_dir / 'kafka-server.log'}\n"
        "appender.file.layout.type = PatternLayout\n"
        "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = INFO\n"
        "rootLogger.appenderRef.file.ref = file\n"
        "logger.kafka.name = org.apache.kafka\n"
        "logger.kafka.level = WARN\n"
    )
    return d / "server.properties"


def _jvm_argv(cfg: Config, main: str, *args: str, heap: str = "256m") -> list[str]:
    log4j = kafka_dir(cfg) / "log4j2.properties"
    return [java_binary(), f"-Xmx{heap}", f"-Dlog4j2.configurationFile={log4j}", "-cp", jvm.classpath(cfg, "kafka"),
            main, *args]


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64 that never starts with '-'.

    kafka-storage parses its arguments with argparse4j, which reads a value starting with '-' as an option
    (one random id in 64 does, and the format fails); Kafka's own ``Uuid.randomUuid`` skips those too.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def format_storage(cfg: Config) -> str:
    """Format the KRaft storage once; returns the cluster id."""
    props = write_config(cfg)
    meta = kafka_dir(cfg) / "data" / "meta.properties"
    if meta.exists():
        for line in meta.read_text().splitlines():
            if line.startswith("cluster.id="):
                return line.split("=", 1)[1]
    cluster_id = new_cluster_id()
    r = subprocess.run(_jvm_argv(cfg, TOOLS["kafka-storage"], "format", "-t", cluster_id, "-c", str(props)),
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise ServiceError(f"kafka storage format failed: {(r.stdout + r.stderr).strip()[-800:]}")
    return cluster_id


def kafka_service(cfg: Config) -> Service:
    """The broker as a managed service; ``start()`` formats the storage first when needed."""
    from runtime.stack import var_dirs

    host, port, cport = broker_address(cfg)
    run, log = var_dirs(cfg)
    props = kafka_dir(cfg) / "server.properties"
    argv = _jvm_argv(cfg, "kafka.Kafka", str(props), heap=cfg.kafka.heap)

    def health() -> bool:
        from confluent_kafka.admin import AdminClient

        from features.eventlog_kafka import KAFKA_LOG

        md = AdminClient({"bootstrap.servers": f"{host}:{port}"}, logger=KAFKA_LOG).list_topics(timeout=1.0)
        return bool(md.brokers)

    svc = KafkaService("kafka", argv, host, port, run, log, health, startup_timeout_s=cfg.kafka.startup_timeout_s)
    svc.cfg, svc.controller_port = cfg, cport
    return svc


class KafkaService(Service):
    """A Service whose start formats storage and checks the controller port too."""

    cfg: Config
    controller_port: int

    def start(self) -> str:
        from core.services import port_open

        if self.pid() is None and port_open(self.host, self.controller_port):
            raise ServiceError(f"kafka: controller port {self.host}:{self.controller_port} is already in use by a "
                               f"process feedrank did not start; set FEEDRANK_KAFKA_CONTROLLER_PORT")
        if self.pid() is None:
            format_storage(self.cfg)
        try:
            return super().start()
        except ServiceError as e:  # the broker logs through log4j2 to its own file: say what it said
            server_log = self.log_dir / "kafka-server.log"
            lines = server_log.read_text(errors="replace").splitlines() if server_log.exists() else []
            why = [ln for ln in lines if " ERROR " in ln or "Exception" in ln][-5:] or lines[-5:]
            raise ServiceError(f"{e} {server_log}: {' | '.join(why)[-1500:]}") from None


def tool_argv(cfg: Config, tool: str, *args: str) -> list[str]:
    """argv of one of Kafka's command-line tools (``TOOLS``), from the fetched jars."""
    if tool not in TOOLS:
        raise ServiceError(f"unknown Kafka tool {tool!r}: one of {', '.join(TOOLS)}")
    write_config(cfg)  # the tools log through the same log4j2 file
    return _jvm_argv(cfg, TOOLS[tool], *args)
