"""A real PyFlink job (thread mode, FileSource monitoring continuously) reads every event once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from features.eventlog_file import FileEventLog
from jobs.audit import run_embedded, validate_line

pytestmark = [pytest.mark.flink, pytest.mark.slow]


def test_validate_line_reports_reasons():
    eid, typ, err = validate_line('{"type": "engagement"}')
    assert typ == "invalid" and err.startswith("engagement: ")
    assert all(f"{f}: Field required" in err for f in ("user_id", "post_id", "action", "ts"))
    assert validate_line("garbage")[1] == "invalid"


def test_100k_events_from_two_processes_read_exactly_once(cfg):
    root = cfg.resolve_uri(cfg.events.uri)[len("file://"):]
    writers = [subprocess.Popen([sys.executable, "-m", "sim.eventgen", "--uri", "file://" + root, "--n", "50000",
                                 "--seed", str(s), "--rotate-ms", "200"]) for s in (1, 2)]
    bad = FileEventLog(root)
    bad.append_lines([b'{"type": "engagement", "user_id": 1}', b"not json at all",
                      b'{"type": "engagement", "user_id": 1, "post_id": 2, "action": "dwell", "ts": 1767571200000}'])
    # one event appended twice by a retrying producer: the job must flag exactly one duplicate
    from sim.eventgen import synthetic_events

    bad.append_lines([next(iter(synthetic_events(1, seed=1))).to_json().encode()])
    bad.close()
    try:
        # the job starts while the writers are still appending: continuous monitoring picks up new segments
        result = run_embedded(cfg, expect=100_004, idle_s=30.0, max_s=400.0)
    finally:
        for w in writers:
            w.wait(timeout=120)
    assert all(w.returncode == 0 for w in writers)
    print("audit job:", result)
    assert result["events"] == 100_004
    assert result["duplicates"] == 1  # the deliberate repeat; the source itself re-read nothing
    assert result["unique_ids"] == 100_000
    assert result["by_type"]["invalid"] == 3
    assert result["invalid_reasons"] == {"engagement": 2, "not JSON": 1}


def _cli_env(cfg, **extra: str) -> dict[str, str]:
    """The environment a user's shell would have for ``cfg``: the test's data dir and event log."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
    env.update(FEEDRANK_PATHS_DATA_DIR=str(cfg.data_dir), FEEDRANK_EVENTS=cfg.events.uri,
               FEEDRANK_REDIS=cfg.redis.uri, FEEDRANK_FLINK_REST_PORT=str(cfg.flink.rest_port), **extra)
    return env


def _feedrank(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    from pathlib import Path

    exe = Path(sys.executable).parent / "feedrank"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_jobs_run_audit_reports_exactly_the_events_of_the_log(make_cfg):
    """`feedrank jobs run audit`: the MiniCluster's start-up (10-13 s measured) is not idle time, so every
    event is counted even with --idle 2 (before the fix: 0 events, exit 0, with any --idle below the
    start-up time); the README's plain command on an empty log is exit 1, saying so."""
    from sim.eventgen import synthetic_events

    cfg = make_cfg()
    log = FileEventLog(cfg.resolve_uri(cfg.events.uri)[len("file://"):])
    log.append_many(list(synthetic_events(12_345, seed=4)))
    log.close()
    r = _feedrank("jobs", "run", "audit", "--idle", "2", env=_cli_env(cfg), timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["events"] == 12_345 and result["unique_ids"] == 12_345, result
    assert result["stopped"] == "idle"

    empty = make_cfg(FEEDRANK_EVENTS=cfg.events.uri + "-empty")
    r = _feedrank("jobs", "run", "audit", env=_cli_env(empty, FEEDRANK_FLINK_STARTUP_TIMEOUT_S="25"), timeout=240)
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr[-2000:])
    assert f"no events in {empty.events.uri} within 25 s: the audit job ran and read nothing" in r.stderr, r.stderr


@pytest.mark.kafka
def test_jobs_run_audit_on_kafka_counts_every_event_once(make_cfg):
    """The audit through Flink's KafkaSource: every event of the topic, bundles split, duplicates found."""
    from features.eventlog import open_configured_event_log
    from runtime import stack
    from core.services import free_port
    from sim.eventgen import synthetic_events

    cfg = make_cfg(FEEDRANK_EVENTS=f"kafka://127.0.0.1:{free_port()}/engagements", FEEDRANK_EVENTS_KAFKA_PARTITIONS="3")
    stack.up(cfg)
    try:
        events = list(synthetic_events(5_000, seed=6))
        log = open_configured_event_log(cfg)
        log.append_many(events)
        log.append_many(events[:10])  # producer retries: the same event ids again
        r = _feedrank("jobs", "run", "audit", "--idle", "5", env=_cli_env(cfg), timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result["events"] == 5_010 and result["duplicates"] == 10 and result["unique_ids"] == 5_000, result
    finally:
        stack.down(cfg)
