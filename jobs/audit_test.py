"""A real PyFlink job (thread mode, FileSource monitoring continuously) reads every event once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from features.eventlog import FileEventLog
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
