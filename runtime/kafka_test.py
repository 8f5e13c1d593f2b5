"""The local Kafka broker as a Kafka user sees it: the README's console-consumer command, from the
fetched jars, reads the events feedrank wrote (one bundle of a partition's events per message)."""

from __future__ import annotations

import json
import subprocess

import pytest

from features.eventlog import open_configured_event_log
from core.events import Engagement
from core import jvm
from runtime import kafka
from runtime import stack
from core.services import free_port

pytestmark = pytest.mark.kafka


def test_console_consumer_from_the_kafka_jars_reads_the_topic(make_cfg):
    port = free_port()
    cfg = make_cfg(FEEDRANK_EVENTS=f"kafka://127.0.0.1:{port}/engagements", FEEDRANK_EVENTS_KAFKA_PARTITIONS="2")
    stack.up(cfg)
    try:
        evs = [Engagement(user_id=u, post_id=100 + u, action="click", ts=1_767_571_200_000 + u) for u in range(6)]
        open_configured_event_log(cfg).append_many(evs)
        # exactly as the README shows it (with this test's port and jar directory)
        cmd = (f'java -cp "{jvm.jvm_dir(cfg)}/kafka/*" org.apache.kafka.tools.consumer.ConsoleConsumer '
               f"--bootstrap-server 127.0.0.1:{port} --topic engagements --from-beginning --max-messages 2 "
               "| tr '\\036' '\\n'")
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        got = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        assert sorted(e["event_id"] for e in got) == sorted(e.event_id for e in evs)  # 2 messages, 6 events
        # the tools feedrank knows by name run from the same classpath
        topics = subprocess.run(kafka.tool_argv(cfg, "kafka-topics", "--bootstrap-server", f"127.0.0.1:{port}",
                                                "--describe", "--topic", "engagements"),
                                capture_output=True, text=True, timeout=120)
        assert topics.returncode == 0 and "PartitionCount: 2" in topics.stdout, topics.stdout + topics.stderr
    finally:
        stack.down(cfg)


def test_jvm_artifacts_are_fetched_once(make_cfg):
    cfg = make_cfg()
    assert jvm.fetched(cfg), "make jvm (part of make test) fetched them"
    stamp = jvm.jvm_dir(cfg) / jvm.STAMP
    before = stamp.stat().st_mtime
    assert jvm.ensure(cfg) == jvm.jvm_dir(cfg)  # already there: no Maven run
    assert stamp.stat().st_mtime == before
    assert jvm.jar(cfg, "flink-sql-connector-kafka").name.startswith("flink-sql-connector-kafka-5.0.0-2.2")
    assert any(p.name.startswith("kafka_2.13-4.") for p in (jvm.jvm_dir(cfg) / "kafka").glob("*.jar"))


def test_missing_maven_is_a_one_line_fix(make_cfg, tmp_path):
    cfg = make_cfg(FEEDRANK_JVM_DIR=str(tmp_path / "jvm"), FEEDRANK_JVM_MAVEN="no-such-mvn")
    with pytest.raises(jvm.JvmArtifactsMissing, match="apt-get install -y maven"):
        jvm.ensure(cfg)


def test_cluster_ids_never_start_with_a_dash():
    """kafka-storage reads '-t -abc' as a missing value: ids must not start with '-' (a CI run failed on one)."""
    from runtime.kafka import new_cluster_id

    ids = [new_cluster_id() for _ in range(5000)]
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids) and all(len(i) == 22 for i in ids)
