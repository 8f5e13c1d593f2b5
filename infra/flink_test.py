"""The standalone Flink cluster: `flink up`, `flink run -py jobs/audit.py`, `flink down`."""

from __future__ import annotations

import json
import time

import psutil
import pytest

from infra import flink

pytestmark = [pytest.mark.flink, pytest.mark.slow]


def test_cluster_runs_submitted_jobs_restarts_a_stuck_one_and_stops_cleanly(make_cfg):
    """`flink up`; the audit job, whose operator stalls in ``open`` the first time (as in PyFlink's
    thread-mode start-up hang), is restarted by the supervisor on a replacement taskmanager and
    then audits the log; the feature job on the same cluster writes Feast; `flink down` leaves nothing."""
    from collections import Counter

    from features.client import FeatureClient, read_progress
    from features.eventlog import open_configured_event_log
    from infra import runtime
    from jobs.startup_stacks import read_dumps
    from sim.eventgen import synthetic_events

    cfg = make_cfg(FEEDRANK_FLINK_STARTUP_TIMEOUT_S="45", FEEDRANK_FLINK_TASK_CANCELLATION_TIMEOUT_S="10")
    events = list(synthetic_events(3000, seed=9))
    log = open_configured_event_log(cfg)
    log.append_many(events)
    log.close()
    exposures = Counter(e.post_id for e in events if e.type == "exposure")
    post, n_exp = exposures.most_common(1)[0]
    runtime.up(cfg)
    said: list[str] = []
    try:
        assert flink.cluster_up(cfg).startswith("started")
        assert flink.cluster_up(cfg).startswith("already running")  # idempotent
        pids = flink.cluster_pids(cfg)
        assert len(pids) == 1 + cfg.flink.taskmanagers  # jobmanager + taskmanagers
        marker = cfg.data_dir / "stall-once"
        job = flink.submit_supervised(cfg, cfg.root / "jobs" / "audit.py", ["--stall-open-once", str(marker)],
                                      say=said.append)
        assert marker.exists() and any("attempt 1 of 3" in s for s in said), said
        # the dump shows where the stuck open waited: the stall inside the tally operator's open
        assert "in open" in read_dumps(cfg) and "audit.py" in read_dumps(cfg), said
        replaced = [p for p in flink.cluster_pids(cfg) if p not in pids]
        assert replaced, "no replacement taskmanager was started"
        assert flink.job_state(cfg, job)[0] == "RUNNING"
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
        fjob = flink.submit_supervised(cfg, cfg.root / "jobs" / "feature_job.py", [], say=said.append)
        client = FeatureClient(cfg)
        deadline = time.monotonic() + 180
        got = None
        while time.monotonic() < deadline:
            got = client.posts([post], ["post_stats:impressions"])["impressions"][0]
            if got == n_exp:
                break
            time.sleep(1)
        assert got == n_exp, (f"impressions {got} != {n_exp}; job {flink.job_state(cfg, fjob)}; "
                              f"progress {read_progress(cfg, 'features')}; {said}")
        pids = flink.cluster_pids(cfg)
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
