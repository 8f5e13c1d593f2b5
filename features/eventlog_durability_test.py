"""OK means durable, for the file:// event log: real processes, real files, a real full disk.

Each test reproduces a loss found by the fault test of issue 15: acknowledged events lost to a
SIGKILL (the append returned before write and fsync), a full disk that killed the rotate thread
and lost events, and orphaned in-progress files left unsealed while other writers ran.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from features.eventlog import RS, EventLogError

from features.eventlog_file import INPROGRESS_DIR, SEGMENTS_DIR, FileEventLog
from core.events import Action, Engagement

TS = 1_767_571_200_000
ROOT = Path(__file__).resolve().parents[1]


def engagement_events(prefix: str, n: int, start: int = 0) -> list[Engagement]:
    return [Engagement(event_id=f"{prefix}-{i}", user_id=i % 997, post_id=i % 10_007, action=Action.CLICK, ts=TS + i)
            for i in range(start, start + n)]


def _sealed(root: Path) -> tuple[list[str], int]:
    """Event ids in the sealed segments, and how many lines/events were not valid JSON (must be 0)."""
    ids, bad = [], 0
    for p in sorted((root / SEGMENTS_DIR).glob("*.jsonl")):
        data = p.read_bytes()
        assert data.endswith(b"\n"), f"{p.name}: sealed without its last newline"
        for line in data.split(b"\n")[:-1]:
            for raw in line.split(RS.encode()):
                try:
                    ids.append(json.loads(raw)["event_id"])
                except (ValueError, KeyError):
                    bad += 1
    return ids, bad


# A writer process: THREADS threads append bursts of 1..40 events; an id is printed only once its
# append_many returned (acknowledged), exactly what a serving worker answers OK after.
WRITER = r"""
import random, sys, threading
from features.eventlog_file import FileEventLog
from features.eventlog_durability_test import engagement_events
log = FileEventLog(sys.argv[1], rotate_ms=int(sys.argv[2]), rotate_events=5000)
out = threading.Lock()
def burst(t):
    rng, i = random.Random(t), 0
    while True:
        n = rng.randint(1, 40)
        evs = engagement_events(f"w{t}", n, i)
        i += n
        log.append_many(evs)
        with out:
            sys.stdout.write("".join(e.event_id + "\n" for e in evs))
            sys.stdout.flush()
print("started", flush=True)
ths = [threading.Thread(target=burst, args=(t,), daemon=True) for t in range(int(sys.argv[3]))]
for th in ths:
    th.start()
for th in ths:
    th.join()
"""


def _writer(root: Path, rotate_ms: int = 200, threads: int = 6) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(rotate_ms), str(threads)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _acked_until_killed(p: subprocess.Popen, n: int, timeout_s: float = 60.0) -> list[str]:
    """Read acknowledged ids until ``n`` arrived, SIGKILL the writer mid-burst, return the ids."""
    assert p.stdout is not None and p.stdout.readline().strip() == "started"
    acked: list[str] = []
    done = threading.Event()

    def read() -> None:
        for line in p.stdout:
            if line.endswith("\n"):  # a line cut by the kill was never fully reported
                acked.append(line[:-1])
        done.set()

    threading.Thread(target=read, daemon=True).start()
    t0 = time.monotonic()
    while len(acked) < n:
        assert p.poll() is None, "the writer died by itself"
        assert time.monotonic() - t0 < timeout_s, f"only {len(acked)} events acknowledged in {timeout_s}s"
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert done.wait(10)
    return acked


def test_sigkill_mid_burst_loses_no_acknowledged_event(tmp_path: Path):
    p = _writer(tmp_path)
    acked = _acked_until_killed(p, 20_000)
    assert p.returncode == -signal.SIGKILL
    assert list((tmp_path / INPROGRESS_DIR).glob("*.jsonl")), "the killed writer left no in-progress file"
    FileEventLog(tmp_path).close()  # recovery: seals the dead writer's file
    ids, bad = _sealed(tmp_path)
    missing = set(acked) - set(ids)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged events lost, e.g. {sorted(missing)[:3]}"
    assert bad == 0
    assert len(ids) == len(set(ids))  # each event once
    assert not list((tmp_path / INPROGRESS_DIR).glob("*.jsonl"))


def test_concurrent_appends_share_commits(tmp_path: Path):
    """Group commit: many threads' appends are written and fsynced together, never one fsync per call."""
    log = FileEventLog(tmp_path, rotate_ms=60_000)
    threads, calls = 8, 150

    def run(t: int) -> None:
        for i in range(calls):
            log.append_many(engagement_events(f"g{t}", 1, i))

    ths = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert log.commits < threads * calls, f"{log.commits} fsyncs for {threads * calls} appends"
    log.close()
    ids, bad = _sealed(tmp_path)
    assert sorted(ids) == sorted(f"g{t}-{i}" for t in range(threads) for i in range(calls)) and bad == 0


def test_full_disk_is_an_error_then_recovers_without_loss(small_disk: Path):
    root = small_disk / "log"
    log = FileEventLog(root, rotate_ms=100, rotate_events=2000)
    ballast = small_disk / "ballast"
    st = os.statvfs(small_disk)
    with open(ballast, "wb") as f:  # leave ~300 KB for the log
        f.write(b"\0" * (st.f_bavail * st.f_frsize - 300_000))
    acked: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    phase = {"name": "full"}

    def run(t: int) -> None:
        i = 0
        while True:
            with lock:
                if phase["name"] == "stop" or (phase["name"] == "full" and len(errors) >= 40):
                    return
            evs = engagement_events(f"d{t}-{phase['name']}", 50, i)
            i += 50
            try:
                log.append_many(evs)
            except EventLogError as e:
                with lock:
                    errors.append(str(e))
                time.sleep(0.01)
                continue
            with lock:
                acked.extend(e.event_id for e in evs)

    ths = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(timeout=60)
    assert len(errors) >= 40, f"the disk never filled ({len(acked)} events acknowledged)"
    assert "No space left on device" in errors[0] and "not accepted, retry" in errors[0], errors[0]
    n_full = len(acked)
    assert n_full > 0
    time.sleep(0.5)  # the rotate thread keeps trying to seal on the full disk
    assert log._ticker.is_alive(), "the rotate thread died on the full disk"

    ballast.unlink()  # space returns
    phase["name"] = "after"
    ths = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for th in ths:
        th.start()
    t0 = time.monotonic()
    while len(acked) < n_full + 4000:
        assert time.monotonic() - t0 < 30, "appends did not succeed again after space returned"
        time.sleep(0.02)
    phase["name"] = "stop"
    for th in ths:
        th.join(timeout=30)
    n_errors = len(errors)
    deadline = time.monotonic() + 10  # the rotate thread (not close) must seal everything acknowledged
    while time.monotonic() < deadline and set(acked) - set(_sealed(root)[0]):
        time.sleep(0.05)
    ids, bad = _sealed(root)
    missing = set(acked) - set(ids)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged events not sealed by the rotate thread"
    assert bad == 0, f"{bad} torn or corrupt events in sealed segments"
    log.close()
    assert len(errors) == n_errors  # nothing failed once space had returned
    assert len(ids) == len(set(ids))


def test_orphan_of_a_killed_writer_is_sealed_by_a_live_writer(tmp_path: Path):
    interval_ms = 500
    live = FileEventLog(tmp_path, rotate_ms=60_000, orphan_seal_ms=interval_ms)
    p = _writer(tmp_path, rotate_ms=600_000, threads=2)  # never seals by itself
    acked = _acked_until_killed(p, 3000)
    t_kill = time.monotonic()
    inprog = tmp_path / INPROGRESS_DIR
    while list(inprog.glob("*.jsonl")):
        assert time.monotonic() - t_kill < interval_ms / 1000 + 1.0, "the orphan was not sealed within the interval"
        time.sleep(0.02)
    ids, bad = _sealed(tmp_path)
    assert set(acked) <= set(ids) and bad == 0
    live.close()


def test_events_stats_skips_and_counts_torn_lines_and_bad_bytes(tmp_path: Path):
    root = tmp_path / "events"
    seg = root / SEGMENTS_DIR
    seg.mkdir(parents=True)
    good = [e.to_json().encode() for e in engagement_events("s", 5)]
    (seg / "0000000000001-a.jsonl").write_bytes(
        good[0] + b"\n"
        + b'{"v":1,"type":"engagement","event_id":"torn' + b"\n"  # a torn line
        + good[1] + RS.encode() + b'{"v":1,"type":"engagement","x":"\xff\xfe"}' + RS.encode() + good[2] + b"\n"
        + b"\xc3\x28 not utf-8\n"  # bad bytes outside any event
        + b"42\n"  # JSON, but not an event object
        + good[3] + RS.encode() + good[4] + b"\n")
    exe = shutil.which("feedrank", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "feedrank.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
    env.update(FEEDRANK_PATHS_DATA_DIR=str(tmp_path / "var"), FEEDRANK_EVENTS="file://" + str(root))
    r = subprocess.run(cmd + ["events", "stats"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["events"] == 5 and out["by_type"] == {"engagement": 5}
    assert out["skipped"] == 4 and out["skipped_by_reason"] == {"not_utf8": 2, "not_json": 1, "not_an_object": 1}


def test_rotate_thread_survives_a_failing_seal(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A seal that fails (here: the segment directory is gone, so the rename fails) is retried on
    every tick; appends stay acknowledged meanwhile, and sealing resumes once it can."""
    log = FileEventLog(tmp_path, rotate_ms=100)
    seg, away = tmp_path / SEGMENTS_DIR, tmp_path / "segments.away"
    seg.rename(away)
    log.append_many(engagement_events("r", 300))
    time.sleep(0.6)  # several failed attempts
    assert log._ticker.is_alive()
    assert any("cannot seal" in r.getMessage() for r in caplog.records)
    assert list((tmp_path / INPROGRESS_DIR).glob("*.jsonl")), "nothing was waiting to be sealed"
    log.append_many(engagement_events("r", 200, 300))  # still accepted: the data is durable in the in-progress file
    away.rename(seg)
    deadline = time.monotonic() + 3
    while list((tmp_path / INPROGRESS_DIR).glob("*.jsonl")):
        assert time.monotonic() < deadline, "sealing did not resume"
        time.sleep(0.02)
    ids, bad = _sealed(tmp_path)
    assert sorted(ids) == sorted(f"r-{i}" for i in range(500)) and bad == 0
    log.close()
