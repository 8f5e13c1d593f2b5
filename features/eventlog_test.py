from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from features.eventlog import open_event_log, read_all

from features.eventlog_file import FileEventLog
from core.events import Engagement, InvalidEvent
from sim.eventgen import synthetic_events

TS = 1_767_571_200_000


def test_append_flush_read(tmp_path: Path):
    log = FileEventLog(tmp_path, rotate_ms=60_000)
    evs = list(synthetic_events(1000, seed=1))
    log.append_many(evs)
    assert read_all(log.reader(), idle_s=0.2) == []  # nothing visible before the segment is sealed
    log.flush()
    lines = read_all(log.reader(), idle_s=0.2)
    assert lines == [e.to_json() for e in evs]
    log.close()


def test_segments_hold_bundles_of_events(tmp_path: Path):
    """A segment line is a bundle of up to bundle_events events (RS-separated); readers return events."""
    from features.eventlog import RS, split_bundle

    evs = [e.to_json() for e in synthetic_events(600, seed=4)]
    for bundle, lines in ((256, 3), (1, 600)):
        log = FileEventLog(tmp_path / str(bundle), rotate_ms=60_000, bundle_events=bundle)
        log.append_many(evs[:100])
        log.append_many(evs[100:])  # bundles span appends
        log.close()
        (seg,) = (tmp_path / str(bundle) / "segments").glob("*.jsonl")
        raw = seg.read_text().split("\n")[:-1]  # (str.splitlines would split at RS too)
        assert len(raw) == lines
        assert [x for line in raw for x in split_bundle(line)] == evs
        assert (RS in raw[0]) == (bundle > 1)
        assert read_all(FileEventLog(tmp_path / str(bundle)).reader(), idle_s=0.2) == evs


def test_rotation_by_count_and_by_time(tmp_path: Path):
    log = FileEventLog(tmp_path, rotate_ms=200, rotate_events=100)
    log.append_many(synthetic_events(250, seed=2))
    assert len(list((tmp_path / "segments").glob("*.jsonl"))) == 2  # two full segments sealed by count
    t0 = time.monotonic()
    while len(list((tmp_path / "segments").glob("*.jsonl"))) < 3:
        assert time.monotonic() - t0 < 2.0, "the 50-event tail was not sealed by age"
        time.sleep(0.02)
    assert len(read_all(log.reader(), idle_s=0.2)) == 250
    log.close()


def test_invalid_batch_is_rejected_whole(tmp_path: Path):
    log = FileEventLog(tmp_path)
    good = Engagement(user_id=1, post_id=2, action="click", ts=TS)
    bad = {"type": "engagement", "user_id": 1, "post_id": 2, "action": "dwell", "ts": TS}
    with pytest.raises(InvalidEvent, match="dwell_ms is required"):
        log.append_many([good, bad])
    log.flush()
    assert read_all(log.reader(), idle_s=0.2) == []
    log.close()


def test_crashed_writer_is_recovered_without_loss(tmp_path: Path):
    """A writer killed after sync() loses nothing: the next writer seals its file."""
    code = (
        "import os, time, sys\n"
        "from features.eventlog_file import FileEventLog\n"
        "from sim.eventgen import synthetic_events\n"
        f"log = FileEventLog({str(tmp_path)!r}, rotate_ms=600000)\n"
        "log.append_many(synthetic_events(777, seed=3))\n"
        "log.sync()\n"
        "f = log._fh; f.write(b'{\"torn'); f.flush()\n"  # a torn partial line, as a crash mid-write leaves
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    other = FileEventLog(tmp_path, orphan_seal_ms=600_000)  # no periodic sweep: this test calls recover() itself
    assert other.recover() == 0  # the live writer still holds its lock: untouched
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert other.recover() == 1
    lines = read_all(other.reader(), idle_s=0.2)
    assert lines == [e.to_json() for e in synthetic_events(777, seed=3)]
    other.close()


def test_two_writer_processes_lose_and_duplicate_nothing(tmp_path: Path):
    uri = "file://" + str(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "sim.eventgen", "--uri", uri, "--n", "20000", "--seed", str(s),
                               "--rotate-ms", "100"]) for s in (10, 11)]
    reader = FileEventLog(tmp_path).reader()
    got: list[str] = []
    while any(p.poll() is None for p in procs):
        got.extend(reader.poll(10_000, timeout=0.1))  # read while they write
    assert all(p.returncode == 0 for p in procs)
    got.extend(read_all(reader, idle_s=0.5))
    ids = Counter(json.loads(x)["event_id"] for x in got)
    assert len(got) == 40_000 and len(ids) == 40_000


def test_unknown_uri_is_a_clear_error():
    from features.eventlog import EventLogError

    with pytest.raises(EventLogError, match="file://<dir> or kafka://"):
        open_event_log("s3://bucket/x")
