"""The feature job on a real Apache Kafka broker through Flink's KafkaSource: exact values with
de-duplication, then a SIGKILL of the job's JVM and a resubmission that resumes from the retained
checkpoint — nothing counted twice, nothing lost (events sent while it was down included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from features.online_store import FeatureClient

from features.progress import read_progress
from features.eventlog import open_configured_event_log
from features.eventlog_kafka import KafkaEventLog
from core.events import Followed, PostPublished
from jobs import flinkenv
from runtime import stack
from core.services import free_port
from jobs.feature_job_test import T, engagement_event, exposure_event, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.flink, pytest.mark.kafka]
POST_COLS = [f"post_stats:{n}" for n in ("impressions", "clicks", "likes", "negatives", "long_dwells", "clicks_1h")]


def _start_job(env: dict[str, str], log: Path, job: str = "features") -> subprocess.Popen:
    """`feedrank jobs run <job>` as a user starts it: its own process (and gateway JVM)."""
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "feedrank.cli", "jobs", "run", job], env=env, stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _kill_jvm(proc: subprocess.Popen) -> int:
    """SIGKILL the job's JVM (the MiniCluster runs inside it), then the CLI that started it."""
    jvms = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == "java"]
    assert jvms, "no JVM under the job's process"
    for j in jvms:
        j.send_signal(signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # SIGKILL is delivered at once but a JVM with many threads and a large heap takes a moment to exit
    deadline = time.monotonic() + 30
    while any(_alive(j) for j in jvms) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(j) for j in jvms), "the JVM outlived SIGKILL by 30 s"
    return jvms[0].pid


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_features_on_kafka_exact_values_then_kill_9_and_resume(make_cfg, tmp_path):
    port = free_port()
    over = dict(FEEDRANK_EVENTS=f"kafka://127.0.0.1:{port}/engagements", FEEDRANK_EVENTS_KAFKA_PARTITIONS="4",
                FEEDRANK_FLINK_CHECKPOINT_INTERVAL_MS="3000", FEEDRANK_STREAMING_FLUSH_MS="100")
    cfg = make_cfg(**over)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
    env.update({"FEEDRANK_PATHS_DATA_DIR": str(cfg.data_dir), "FEEDRANK_REDIS": cfg.redis.uri,
                "FEEDRANK_FLINK_REST_PORT": str(cfg.flink.rest_port),
                "FEEDRANK_MODEL_STORE": cfg.model_store.uri, **over})
    job_log = tmp_path / "job.log"
    stack.up(cfg)
    proc = None
    try:
        log = open_configured_event_log(cfg)
        assert isinstance(log, KafkaEventLog) and log.partitions == 4
        click1 = engagement_event("c1", 1, 7, "click", T + 1_000)
        # partitions are ordered only within themselves: the post (author 11's partition) is published
        # and known to the job before anyone's engagement with it, as in life
        log.append(PostPublished(event_id="pub7", ts=T, post_id=7, author_id=11, topic=3, content_type="video",
                                 text="red fox"))
        proc = _start_job(env, job_log)
        wait_until("the published post", lambda: read_progress(cfg, "features").get("post_events", 0) >= 1, timeout=180)
        log.append_many([
            exposure_event("x1", 1, 7, 1, T + 100), exposure_event("x2", 2, 7, 2, T + 200), exposure_event("x3", 3, 7, 3, T + 300),
            click1, engagement_event("c2", 2, 7, "click", T + 2_000), engagement_event("l1", 1, 7, "like", T + 2_500),
            engagement_event("h3", 3, 7, "hide", T + 3_000), engagement_event("d2", 2, 7, "dwell", T + 4_000, dwell=40_000),
            engagement_event("d3", 3, 7, "dwell", T + 4_100, dwell=1_000), engagement_event("v3", 3, 7, "view", T + 4_200),
            Followed(event_id="f1", ts=T + 5_000, user_id=1, author_id=11),
        ])
        log.append(click1)  # a producer retry: the same event id again, in another message
        client = FeatureClient(cfg)

        observed: list = []

        def post7(imps: int, clicks: int):
            def check():
                got = client.posts([7], POST_COLS)
                observed[:] = [got, read_progress(cfg, "features")]
                return got if got["impressions"][0] == imps and got["clicks"][0] == clicks else {}
            return check

        got = wait_until("post 7 stats from Kafka", post7(3, 2), timeout=180)
        assert [got[k][0] for k in ("impressions", "clicks", "likes", "negatives", "long_dwells", "clicks_1h")] == \
            [3, 2, 1, 1, 1, 2]
        u1 = wait_until("user 1", lambda: (lambda u: u if u["clicks"] == 1 else None)(client.user(1)))
        assert u1["topic_clicks"][3] == pytest.approx(1.0)
        prog = wait_until("dedupe count", lambda: (lambda p: p if p.get("dedupe_duplicates") == 1 else None)(
            read_progress(cfg, "features")))
        assert prog["post_events"] >= 12
        # events on every partition: the Kafka source's per-partition watermarks all advance
        log.append_many([exposure_event(f"hb{i}", 100 + i, 8, 1, T + 600_000 + i) for i in range(8)])

        # a checkpoint that holds phase 1, then phase 2 is processed, then kill -9 of the JVM
        wait_until("the heartbeats", lambda: read_progress(cfg, "features").get("post_events", 0) >= 21)
        seen = time.time()
        ck1 = wait_until("a checkpoint after phase 1", lambda: (lambda c: c if c and c.stat().st_mtime > seen + 0.5 else None)(
            flinkenv.latest_checkpoint(cfg, "features")))
        log.append_many([exposure_event(f"y{i}", 10 + i, 7, 4, T + 10_000 + i) for i in range(4)] + [engagement_event("c4", 4, 7, "click", T + 11_000)])
        wait_until("phase 2", post7(7, 3))
        before_kill = flinkenv.latest_checkpoint(cfg, "features")
        jvm = _kill_jvm(proc)
        proc = None

        # events while the job is down, including repeats of ids it has seen before
        log.append_many([exposure_event(f"z{i}", 30 + i, 7, 6, T + 13_000 + i) for i in range(2)]
                        + [exposure_event("x1", 1, 7, 1, T + 100), engagement_event("c4", 4, 7, "click", T + 11_000)])
        restored = flinkenv.latest_checkpoint(cfg, "features")
        assert restored is not None and restored.parent.parent == flinkenv.checkpoint_root(cfg, "features")
        proc = _start_job(env, job_log)
        try:
            wait_until("the resumed job", post7(9, 3), timeout=180)
        except AssertionError:
            raise AssertionError(f"post 7 and progress after the resume: {observed}; job log: {job_log.read_text()[-1500:]}")
        assert f"resuming from checkpoint {restored}" in job_log.read_text(), job_log.read_text()[-3000:]
        jvm_log = "".join(p.read_text(errors="replace") for p in (cfg.data_dir / "flink" / "log-features").glob("*.log"))
        assert f"located at file:{restored}" in jvm_log  # Flink restored that checkpoint
        time.sleep(4)  # anything double counted by the replay from the checkpoint would show by now
        got = client.posts([7], POST_COLS)
        assert got["impressions"][0] == 3 + 4 + 2 and got["clicks"][0] == 3 and got["likes"][0] == 1
        p = read_progress(cfg, "features")
        assert p["post_opened"] >= 2
        # the replay re-reads what came after the restored checkpoint: the repeats of x1/c4 are duplicates
        assert p["dedupe_duplicates"] >= 2  # progress counts are per run
        print(f"killed JVM {jvm}; checkpoint before the kill {before_kill} (phase 1: {ck1}); resumed from {restored}")
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        stack.down(cfg)
