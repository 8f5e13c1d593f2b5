"""The standalone Flink cluster: `flink up`, `flink run -py jobs/audit.py`, `flink down`."""

from __future__ import annotations

import json
import time

import psutil
import pytest

from infra import flink

pytestmark = [pytest.mark.flink, pytest.mark.slow]


def test_cluster_runs_a_submitted_job_and_stops_cleanly(cfg):
    from features.eventlog import open_configured_event_log
    from sim.eventgen import synthetic_events

    from collections import Counter

    from features.client import FeatureClient
    from infra import runtime

    events = list(synthetic_events(3000, seed=9))
    log = open_configured_event_log(cfg)
    log.append_many(events)
    log.close()
    exposures = Counter(e.post_id for e in events if e.type == "exposure")
    post, n_exp = exposures.most_common(1)[0]
    runtime.up(cfg)
    try:
        assert flink.cluster_up(cfg).startswith("started")
        assert flink.cluster_up(cfg).startswith("already running")  # idempotent
        pids = flink.cluster_pids(cfg)
        assert len(pids) == 1 + cfg.flink.taskmanagers  # jobmanager + taskmanagers
        r = flink.submit(cfg, cfg.root / "jobs" / "audit.py", [])
        assert r.returncode == 0 and "JobID" in r.stdout, r.stdout[-3000:] + r.stderr[:3000]
        deadline = time.monotonic() + 120
        summary = None
        while time.monotonic() < deadline:
            outs = list(flink.cluster_dirs(cfg)["log"].glob("*taskexecutor*.out"))
            lines = [ln for f in outs for ln in f.read_text().splitlines() if ln.startswith("{")]
            if lines:
                summary = json.loads(lines[-1])
                if summary["events"] >= 3000:
                    break
            time.sleep(1)
        assert summary is not None and summary["events"] == 3000 and summary["duplicates"] == 0

        # the real-time feature job on the same cluster writes the same log's features to Feast
        r = flink.submit(cfg, cfg.root / "jobs" / "feature_job.py", [])
        assert r.returncode == 0 and "JobID" in r.stdout, r.stdout[-3000:] + r.stderr[:3000]
        client = FeatureClient(cfg)
        deadline = time.monotonic() + 120
        got = None
        while time.monotonic() < deadline:
            got = client.posts([post], ["post_stats:impressions"])["impressions"][0]
            if got == n_exp:
                break
            time.sleep(1)
        assert got == n_exp
    finally:
        assert flink.cluster_down(cfg) in ("stopped", "not running")
        runtime.down(cfg)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert flink.rest_overview(cfg) is None


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(flink.JavaMissing, match="Java 17"):
        flink.require_java()


def test_kafka_without_connector_jar_says_what_is_missing(make_cfg):
    from jobs.sources import MissingConnector, kafka_connector_jar

    cfg = make_cfg(FEEDRANK_EVENTS="kafka://127.0.0.1:9092/engagements")
    with pytest.raises(MissingConnector, match="FEEDRANK_EVENTS_FLINK_CONNECTOR_JAR"):
        kafka_connector_jar(cfg)
    with pytest.raises(MissingConnector, match="does not exist"):
        kafka_connector_jar(make_cfg(FEEDRANK_EVENTS="kafka://127.0.0.1:9092/e",
                                     FEEDRANK_EVENTS_FLINK_CONNECTOR_JAR="/nope.jar"))
