"""`feedrank jobs run features` when the job hangs at its first element (as it once did in a Parquet
read of the bootstrap catalog, RUNNING with no progress): the watchdog sees a warm-up that does not
end within flink.startup_timeout_s, says so, restarts the job in a fresh JVM, and the job then
counts every event exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from features.online_store import FeatureClient
from features.eventlog import open_configured_event_log
from runtime import stack
from runtime.procs import stop_group
from jobs.feature_job import STALL_WARM_UP_ONCE
from jobs.feature_job_test import wait_until
from sim.eventgen import synthetic_events

pytestmark = [pytest.mark.slow, pytest.mark.flink]


def test_a_job_stuck_at_its_first_element_is_restarted(make_cfg, tmp_path):
    over = {"FEEDRANK_FLINK_STARTUP_TIMEOUT_S": "20", "FEEDRANK_STREAMING_FLUSH_MS": "100"}
    cfg = make_cfg(**over)
    events = list(synthetic_events(2000, seed=3))
    post, n_exp = Counter(e.post_id for e in events if e.type == "exposure").most_common(1)[0]
    stack.up(cfg)
    marker = tmp_path / "stalled"
    out = tmp_path / "job.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
    env.update({"FEEDRANK_PATHS_DATA_DIR": str(cfg.data_dir), "FEEDRANK_EVENTS": cfg.events.uri,
                "FEEDRANK_REDIS": cfg.redis.uri, "FEEDRANK_FLINK_REST_PORT": str(cfg.flink.rest_port),
                "FEEDRANK_MODEL_STORE": cfg.model_store.uri, STALL_WARM_UP_ONCE: str(marker), **over})
    proc = None
    try:
        log = open_configured_event_log(cfg)
        log.append_many(events)
        log.close()
        proc = subprocess.Popen([sys.executable, "-m", "feedrank.cli", "jobs", "run", "features", "--seconds", "240"],
                                env=env, stdout=open(out, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        client = FeatureClient(cfg)
        wait_until("the restart", lambda: "did not get ready" in out.read_text(), timeout=180)
        assert marker.exists()  # it hung in the warm-up, and was found there
        text = out.read_text()
        assert "_warmed) in time: restarting it in a fresh JVM (attempt 2 of 3)" in text, text[-3000:]
        got = wait_until(f"post {post}'s impressions after the restart",
                    lambda: client.posts([post], ["post_stats:impressions"])["impressions"][0] == n_exp, timeout=240)
        assert got
    finally:
        if proc is not None:
            stop_group(proc)
        stack.down(cfg)
