"""`feedrank up | status | down` with real Redis and Apache Kafka processes."""

from __future__ import annotations

import socket
import subprocess
import sys

import psutil
import pytest
import redis

from runtime import stack
from core.services import ServiceError, free_port


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_up_status_down_with_file_event_log(cfg):
    try:
        out = dict(stack.up(cfg))
        assert out["redis"] == "started" and "ready" in out["event-log"]
        assert dict(stack.up(cfg))["redis"] == "already running"  # idempotent
        st = {s["name"]: s for s in stack.status(cfg)}
        assert st["redis"]["healthy"] and st["event-log"]["healthy"]
        r = redis.Redis.from_url(cfg.redis.uri)
        r.set("k", "v")
        assert r.get("k") == b"v"
        pid = st["redis"]["pid"]
    finally:
        down = dict(stack.down(cfg))
    assert down["redis"] == "stopped"
    assert not _alive(pid)
    assert not any(s["healthy"] for s in stack.status(cfg) if s["name"] == "redis")
    assert dict(stack.down(cfg)) == {}  # nothing left to stop


@pytest.mark.kafka
def test_up_starts_a_kraft_kafka_broker_for_kafka_event_log(make_cfg):
    from confluent_kafka.admin import AdminClient

    port = free_port()
    cfg = make_cfg(FEEDRANK_EVENTS=f"kafka://127.0.0.1:{port}/engagements", FEEDRANK_EVENTS_KAFKA_PARTITIONS="3")
    try:
        out = dict(stack.up(cfg))
        assert out["kafka"] == "started" and "topic engagements ready" in out["event-log"]
        assert (cfg.data_dir / "kafka" / "data" / "meta.properties").exists()  # KRaft storage formatted
        st = {s["name"]: s for s in stack.status(cfg)}
        assert st["kafka"]["healthy"] and st["redis"]["healthy"] and st["event-log"]["healthy"]
        md = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=10)
        assert len(md.topics["engagements"].partitions) == 3
        assert dict(stack.up(cfg))["kafka"] == "already running"
        pids = [st["kafka"]["pid"], st["redis"]["pid"]]
        cluster_id = (cfg.data_dir / "kafka" / "data" / "meta.properties").read_text()
    finally:
        stack.down(cfg)
    assert not any(_alive(p) for p in pids)
    try:  # a restart keeps the formatted storage and the topic
        assert dict(stack.up(cfg))["kafka"] == "started"
        assert (cfg.data_dir / "kafka" / "data" / "meta.properties").read_text() == cluster_id
        md = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=10)
        assert "engagements" in md.topics
    finally:
        stack.down(cfg)


@pytest.mark.kafka
def test_kafka_port_taken_is_a_clear_error(make_cfg):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = make_cfg(FEEDRANK_EVENTS=f"kafka://127.0.0.1:{port}/engagements")
        with pytest.raises(ServiceError, match=f"kafka: port 127.0.0.1:{port} is already in use"):
            stack.up(cfg)
    stack.down(cfg)


def test_port_taken_is_a_clear_error_not_a_hang(make_cfg):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = make_cfg(FEEDRANK_REDIS=f"redis://127.0.0.1:{port}/0")
        with pytest.raises(ServiceError, match=f"port 127.0.0.1:{port} is already in use"):
            stack.up(cfg)
    assert stack.down(cfg) == []


def test_down_never_kills_a_process_it_did_not_start(cfg):
    """A stale pid file whose pid now belongs to another program is ignored."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        run, _ = stack.var_dirs(cfg)
        run.mkdir(parents=True, exist_ok=True)
        (run / "redis.pid").write_text(
            f'{{"pid": {other.pid}, "exe": "/usr/bin/redis-server", "argv": ["/usr/bin/redis-server"]}}')
        stack.down(cfg)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_cli_up_status_down(cfg, tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
    env.update({"FEEDRANK_PATHS_DATA_DIR": str(cfg.data_dir), "FEEDRANK_REDIS": cfg.redis.uri,
                "FEEDRANK_EVENTS": cfg.events.uri})
    run = lambda *a: subprocess.run([sys.executable, "-m", "feedrank.cli", *a], env=env, capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    try:
        assert run("up").returncode == 0
        st = run("status", "--json")
        assert st.returncode == 0, st.stderr
        assert "redis" in st.stdout
    finally:
        assert run("down").returncode == 0
    assert run("status", "--json").returncode == 1  # redis is down now
