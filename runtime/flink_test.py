"""The standalone Flink cluster: `flink up`, `flink submit`, `flink env` + a plain `flink run -py`, `flink down`."""

from __future__ import annotations

import json
import re
import subprocess
import time

import psutil
import pytest

from core.config import PROJECT_ROOT
from jobs import flinkenv
from runtime import flink

pytestmark = [pytest.mark.flink, pytest.mark.slow]


def test_cluster_runs_submitted_jobs_restarts_a_stuck_one_and_stops_cleanly(make_cfg):
    """`flink up`; the audit job, whose operator stalls in ``open`` the first time (as in PyFlink's
    thread-mode start-up hang), is restarted by the supervisor on a replacement taskmanager and
    then audits the log; the feature job on the same cluster writes Feast; `flink down` leaves nothing."""
    from collections import Counter

    from features.online_store import FeatureClient

    from features.progress import read_progress
    from features.eventlog import open_configured_event_log
    from runtime import stack
    from jobs.startup_stacks import read_dumps
    from sim.eventgen import synthetic_events

    cfg = make_cfg(FEEDRANK_FLINK_STARTUP_TIMEOUT_S="45", FEEDRANK_FLINK_TASK_CANCELLATION_TIMEOUT_S="10")
    events = list(synthetic_events(3000, seed=9))
    log = open_configured_event_log(cfg)
    log.append_many(events)
    log.close()
    exposures = Counter(e.post_id for e in events if e.type == "exposure")
    post, n_exp = exposures.most_common(1)[0]
    stack.up(cfg)
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
        assert flinkenv.job_state(cfg, job)[0] == "RUNNING"
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
        assert got == n_exp, (f"impressions {got} != {n_exp}; job {flinkenv.job_state(cfg, fjob)}; "
                              f"progress {read_progress(cfg, 'features')}; {said}")
        pids = flink.cluster_pids(cfg)
    finally:
        assert flink.cluster_down(cfg) in ("stopped", "not running")
        stack.down(cfg)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert flink.rest_overview(cfg) is None


def _cli_env(cfg, **extra: str) -> dict[str, str]:
    """A newcomer's shell for ``cfg`` (the test's data dir, log, Redis, ports): no FLINK_* variables,
    no PYTHONPATH, neither the venv's nor pyflink's bin on PATH."""
    import os
    import sys
    from pathlib import Path

    drop = {str(Path(sys.executable).parent), str(flinkenv.flink_home() / "bin")}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FEEDRANK_", "FLINK_", "PYFLINK_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p not in drop)
    env.update({"FEEDRANK_PATHS_DATA_DIR": str(cfg.data_dir), "FEEDRANK_EVENTS": cfg.events.uri,
                "FEEDRANK_REDIS": cfg.redis.uri, "FEEDRANK_FLINK_REST_PORT": str(cfg.flink.rest_port),
                "FEEDRANK_MODEL_STORE": cfg.model_store.uri, **extra})
    return env


def _shell(cmd: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``cmd`` in bash from the project root, as the README's commands are typed."""
    return subprocess.run(["bash", "-c", cmd], cwd=str(PROJECT_ROOT), env=env, capture_output=True, text=True,
                          timeout=timeout)


def _job_stdout(cfg, job_id: str) -> str:
    """What the job's last operator printed: the stdout of the taskmanager it runs on (REST)."""
    import urllib.request

    last = flinkenv.rest(cfg, f"/jobs/{job_id}")["vertices"][-1]["id"]
    ports = {t["endpoint"].rsplit(":", 1)[1] for t in
             flinkenv.rest(cfg, f"/jobs/{job_id}/vertices/{last}/taskmanagers")["taskmanagers"]}
    out = ""
    for tm in flinkenv.rest(cfg, "/taskmanagers")["taskmanagers"]:
        if str(tm["dataPort"]) in ports:
            url = f"http://localhost:{cfg.flink.rest_port}/taskmanagers/{tm['id']}/stdout"
            with urllib.request.urlopen(url, timeout=10) as r:
                out += r.read().decode()
    return out


def _submitted(r: subprocess.CompletedProcess, job: str) -> tuple[str, int]:
    """(job id, checkpoints) from `feedrank flink submit`'s last line."""
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    m = re.search(rf"{job}: job ([0-9a-f]{{32}}) running, (\d+) checkpoints? completed", r.stderr)
    assert m, r.stderr[-3000:]
    return m.group(1), int(m.group(2))


def test_readme_flink_commands_as_a_user_types_them(make_cfg, tmp_path):
    """README "Flink" and "Streaming jobs", each command in a shell as a newcomer types it, on the
    default transport, Kafka: `up` (Redis and the broker), `flink up`; `flink submit` of the feature
    job and the learner returns once each completed a checkpoint; the feature job's counts in Feast
    are exact; a second submission of a running job is refused; cancelled and submitted again, the
    feature job resumes from its retained checkpoint (`flink run -s`) on a fresh taskmanager and
    counts nothing twice; `eval "$(feedrank flink env)"` then a plain `flink run -py jobs/audit.py`
    audits every event on the same cluster (its client log under var/flink, not in site-packages);
    `flink down`."""
    from collections import Counter

    import numpy as np

    from features.online_store import FeatureClient
    from features.eventlog import open_configured_event_log
    from features.eventlog_kafka import KafkaEventLog
    from core.schema import HEAVY_FEATURES, HEAVY_SCHEMA_HASH
    from core.services import free_port
    from jobs.feature_job_test import T, exposure_event
    from models import rankers
    from models.store import ModelStore
    from sim.eventgen import synthetic_events

    # a taskmanager per running Python job (pemja: a taskmanager that ran one Python job cannot run
    # another; `flink submit` replaces such a taskmanager once its job ended)
    over = {"FEEDRANK_FLINK_TASKMANAGERS": "3", "FEEDRANK_EVENTS": f"kafka://127.0.0.1:{free_port()}/engagements",
            "FEEDRANK_EVENTS_KAFKA_PARTITIONS": "4", "FEEDRANK_FLINK_CHECKPOINT_INTERVAL_MS": "3000"}
    cfg = make_cfg(**over)
    env = _cli_env(cfg, **over)
    heavy = rankers.HeavyRanker(len(HEAVY_FEATURES))  # the learner needs a current heavy model, trained or not
    n = len(HEAVY_FEATURES)
    heavy.set_normalization(np.zeros(n, np.float32), np.ones(n, np.float32), np.full(n, -1e9), np.full(n, 1e9))
    ModelStore.from_config(cfg).publish("heavy", {"heavy.ts": rankers.export_torchscript(heavy, np.ones(6, np.float32)),
                                                  "heavy.npz": rankers.heavy_npz(heavy)},
                                        feature_schema_hash=HEAVY_SCHEMA_HASH, promote=True)
    client_logs = set((flinkenv.flink_home() / "log").iterdir())
    r = _shell(".venv/bin/feedrank up", env)  # Redis for Feast and the learner; the Kafka broker
    assert r.returncode == 0, r.stderr
    try:
        events = list(synthetic_events(3000, seed=5))
        log = open_configured_event_log(cfg)
        assert isinstance(log, KafkaEventLog)
        log.append_many(events)
        post, n_exp = Counter(e.post_id for e in events if e.type == "exposure").most_common(1)[0]
        # started from elsewhere: nothing may depend on the directory `flink up` ran in
        r = subprocess.run([str(PROJECT_ROOT / ".venv/bin/feedrank"), "flink", "up"], cwd=str(tmp_path), env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "started" in r.stderr, r.stderr
        ids = {}
        for job in ("feature_job.py", "learner.py"):
            r = _shell(f".venv/bin/feedrank flink submit jobs/{job}", env)
            print(r.stderr)
            ids[job], checkpoints = _submitted(r, job)
            assert checkpoints >= 1
            assert flinkenv.rest(cfg, f"/jobs/{ids[job]}/checkpoints")["counts"]["completed"] >= checkpoints
            assert flinkenv.job_state(cfg, ids[job])[0] == "RUNNING"
        client = FeatureClient(cfg)

        def impressions(want: int) -> bool:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and client.posts([post], ["post_stats:impressions"])["impressions"][0] != want:
                time.sleep(1)
            return client.posts([post], ["post_stats:impressions"])["impressions"][0] == want

        assert impressions(n_exp), f"post {post}: {client.posts([post], ['post_stats:impressions'])} != {n_exp} from Kafka"
        r = _shell(".venv/bin/feedrank flink submit jobs/feature_job.py", env)
        assert r.returncode == 1 and f"already runs on this cluster (job {ids['feature_job.py']})" in r.stderr, r.stderr

        # cancel the feature job after a checkpoint holding every event; submit it again: it resumes
        seen = time.time()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not ((c := flinkenv.latest_checkpoint(cfg, "features"))
                                                   and c.stat().st_mtime > seen + 0.5):
            time.sleep(0.5)
        tms = set(flink.live_taskmanagers(cfg))
        flinkenv.rest(cfg, f"/jobs/{ids['feature_job.py']}?mode=cancel", method="PATCH")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and flinkenv.job_state(cfg, ids["feature_job.py"])[0] != "CANCELED":
            time.sleep(0.5)
        restored = flinkenv.latest_checkpoint(cfg, "features")
        assert restored is not None and restored.parent.name == ids["feature_job.py"]
        log.append_many([exposure_event(f"again{i}", 10 + i, post, 2, T + 10_000 + i) for i in range(5)])
        r = _shell(".venv/bin/feedrank flink submit jobs/feature_job.py", env)
        print(r.stderr)
        resumed, _ = _submitted(r, "feature_job.py")
        assert f"resuming from checkpoint {restored}" in r.stderr, r.stderr
        assert "attempt 1 of" not in r.stderr, r.stderr  # it went to a fresh taskmanager the first time
        assert len(tms - set(flink.live_taskmanagers(cfg))) == 1  # the cancelled job's, replaced
        assert impressions(n_exp + 5), client.posts([post], ["post_stats:impressions"])
        time.sleep(4)  # a replay of what the checkpoint held would show by now
        assert client.posts([post], ["post_stats:impressions"])["impressions"][0] == n_exp + 5
        assert flinkenv.job_state(cfg, resumed)[0] == "RUNNING"

        r = _shell('eval "$(.venv/bin/feedrank flink env)" && '
                   f"flink run -m localhost:{cfg.flink.rest_port} --detached -py jobs/audit.py "
                   "-pyexec .venv/bin/python -pyclientexec .venv/bin/python", env)
        m = re.search(r"JobID ([0-9a-f]{32})", r.stdout)
        assert r.returncode == 0 and m, (r.stdout + r.stderr)[-3000:]
        audit = m.group(1)
        deadline = time.monotonic() + cfg.flink.startup_timeout_s + 60
        summary: dict = {}
        while time.monotonic() < deadline and summary.get("events", 0) < 3005:
            state, vertices = flinkenv.job_state(cfg, audit)
            assert state in ("CREATED", "INITIALIZING", "RUNNING"), (state, flinkenv.job_failure(cfg, audit))
            if state == "RUNNING" and vertices and all(v == "RUNNING" for v in vertices.values()):
                lines = [ln for ln in _job_stdout(cfg, audit).splitlines() if ln.startswith("{")]
                summary = json.loads(lines[-1]) if lines else {}
            time.sleep(1)
        assert summary.get("events") == 3005 and summary["duplicates"] == 0, (
            summary, flinkenv.job_state(cfg, audit), flink.rest_overview(cfg), flinkenv.rest(cfg, "/jobs/overview"))
        flinkenv.rest(cfg, f"/jobs/{audit}?mode=cancel", method="PATCH")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and flinkenv.job_state(cfg, audit)[0] != "CANCELED":
            time.sleep(1)
        assert flinkenv.job_state(cfg, audit)[0] == "CANCELED"
        assert list(flink.cluster_dirs(cfg)["log"].glob("flink-*-client-*.log"))
        assert set((flinkenv.flink_home() / "log").iterdir()) == client_logs  # nothing written into site-packages
        pids = flink.cluster_pids(cfg)
    finally:
        r = _shell(".venv/bin/feedrank flink down", env)
        down = _shell(".venv/bin/feedrank down", env)
    assert r.returncode == 0 and "stopped" in r.stderr, r.stderr
    assert down.returncode == 0, down.stderr
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(flinkenv.JavaMissing, match="Java 17"):
        flinkenv.require_java()


def test_kafka_connector_is_found_or_what_is_missing_is_said(make_cfg, tmp_path):
    from jobs.sources import MissingConnector, kafka_connector_jar

    cfg = make_cfg(FEEDRANK_EVENTS="kafka://127.0.0.1:9092/engagements")
    assert kafka_connector_jar(cfg).name == "flink-sql-connector-kafka-5.0.0-2.2.jar"  # fetched by make jvm
    with pytest.raises(MissingConnector, match="apt-get install -y maven"):  # not fetched, and no Maven to fetch it
        kafka_connector_jar(make_cfg(FEEDRANK_EVENTS="kafka://127.0.0.1:9092/e", FEEDRANK_JVM_DIR=str(tmp_path / "jvm"),
                                     FEEDRANK_JVM_MAVEN="no-such-mvn"))
    with pytest.raises(MissingConnector, match="does not exist"):
        kafka_connector_jar(make_cfg(FEEDRANK_EVENTS="kafka://127.0.0.1:9092/e",
                                     FEEDRANK_EVENTS_FLINK_CONNECTOR_JAR="/nope.jar"))
