"""The kafka:// backend against a real Apache Kafka broker: byte-identical events both ways, bundles
per partition, and an append that answers only after the broker acknowledged it."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from features.eventlog import EventLogError, open_event_log, read_all

from features.eventlog_file import FileEventLog

from features.eventlog_kafka import KafkaEventLog
from runtime import stack
from core.services import free_port
from sim.eventgen import synthetic_events

pytestmark = pytest.mark.kafka


@pytest.fixture
def kafka_cfg(make_cfg):
    cfg = make_cfg(FEEDRANK_EVENTS=f"kafka://127.0.0.1:{free_port()}/engagements", FEEDRANK_EVENTS_KAFKA_PARTITIONS="4")
    stack.up(cfg)
    yield cfg
    stack.down(cfg)


def test_same_events_through_kafka_come_back_identical(kafka_cfg, tmp_path):
    events = list(synthetic_events(100_000, seed=21))
    flog = FileEventLog(tmp_path / "file")
    flog.append_many(events)
    flog.close()
    file_lines = read_all(flog.reader(), idle_s=0.3)

    klog = open_event_log(kafka_cfg.events.uri, partitions=4, bundle_events=512)
    assert isinstance(klog, KafkaEventLog) and klog.partitions == 4
    for i in range(0, len(events), 5000):
        klog.append_many(events[i: i + 5000])
    klog.flush()
    reader = klog.reader()
    kafka_lines = read_all(reader, expect=len(events), idle_s=5.0, max_s=180)
    reader.close()
    assert len(file_lines) == len(kafka_lines) == 100_000
    assert Counter(kafka_lines) == Counter(file_lines)  # same bytes (order is per partition)
    # one bundle per message: 20 appends x 4 partitions x ceil(~1250 / 512) messages, not 100K
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": klog.bootstrap, "group.id": "count"})
    offsets = [c.get_watermark_offsets(TopicPartition(klog.topic, p), timeout=10)[1] for p in range(4)]
    c.close()
    assert 20 * 4 <= sum(offsets) <= 20 * 4 * 3
    # partitioned by user id: one user's events keep their order
    per_user = {}
    for ln in kafka_lines:
        d = json.loads(ln)
        key = d.get("user_id", d.get("author_id"))
        assert per_user.get(key, -1) < d["ts"]
        per_user[key] = d["ts"]


def test_a_message_is_one_partitions_bundle_stamped_with_its_latest_event_time(kafka_cfg):
    from confluent_kafka import Consumer, TopicPartition

    from features.eventlog import split_bundle
    from core.events import Engagement

    klog = open_event_log(kafka_cfg.events.uri, partitions=4)
    evs = [Engagement(user_id=u, post_id=1, action="click", ts=1_767_571_200_000 + 10 * i) for i, u in
           enumerate([1, 5, 2, 9, 13])]  # users 1, 5, 9, 13 -> partition 1; 2 -> partition 2
    assert klog.append_many(evs) == 5
    c = Consumer({"bootstrap.servers": klog.bootstrap, "group.id": "bundles"})
    c.assign([TopicPartition(klog.topic, p, 0) for p in range(4)])
    msgs = []
    while len(msgs) < 2:
        msgs += [m for m in c.consume(10, 1.0) if not m.error()]
    c.close()
    by_part = {m.partition(): m for m in msgs}
    assert sorted(by_part) == [1, 2]
    assert [json.loads(x)["user_id"] for x in split_bundle(by_part[1].value().decode())] == [1, 5, 9, 13]
    assert by_part[1].timestamp()[1] == evs[4].ts and by_part[2].timestamp()[1] == evs[2].ts


def test_append_raises_when_the_broker_is_gone_and_keeps_what_was_acknowledged(kafka_cfg):
    from core.events import Engagement

    klog = open_event_log(kafka_cfg.events.uri, timeout_s=3.0)
    ok = [Engagement(user_id=1, post_id=1, action="click", ts=1_767_571_200_000)]
    klog.append_many(ok)
    assert [s for s in stack.managed_services(kafka_cfg) if s.name == "kafka"][0].stop() == "stopped"
    with pytest.raises(EventLogError, match="not acknowledged|failed delivery"):
        klog.append_many([Engagement(user_id=2, post_id=1, action="click", ts=1_767_571_200_001)])
    stack.up(kafka_cfg)
    reader = KafkaEventLog(kafka_cfg.events.uri, create_topic=False).reader()
    lines = read_all(reader, idle_s=3.0, max_s=60)
    reader.close()
    assert [json.loads(x)["event_id"] for x in lines] == [ok[0].event_id]


def test_unreachable_broker_is_a_clear_error():
    with pytest.raises(EventLogError, match="unreachable"):
        KafkaEventLog(f"kafka://127.0.0.1:{free_port()}/t", timeout_s=2.0)
