"""The demo end to end, shortened: a tiny world, 90 s of simulated clients, on a real Kafka broker."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from core.services import free_port

pytestmark = [pytest.mark.slow, pytest.mark.flink, pytest.mark.kafka]


def test_short_demo_runs_everything_and_reports_measured_figures(make_cfg, tmp_path):
    from lab.demo import run_demo

    cfg = make_cfg(FEEDRANK_SIM_SCALES_SMALL_USERS="1500", FEEDRANK_SIM_SCALES_SMALL_CREATORS="300",
                   FEEDRANK_SIM_SCALES_SMALL_POSTS="8000", FEEDRANK_SIM_SCALES_SMALL_IMPRESSIONS="200000",
                   FEEDRANK_RETRIEVAL_NLIST="64", FEEDRANK_RETRIEVAL_NPROBE="32",
                   FEEDRANK_SERVING_PORT=str(free_port()), FEEDRANK_SERVING_METRICS_PORT=str(free_port()),
                   FEEDRANK_SERVING_HTTP_PORT=str(free_port()),
                   FEEDRANK_EVENTS=f"kafka://127.0.0.1:{free_port()}/engagements")
    out = io.StringIO()
    rc = run_demo(cfg, scale="small", users=80, minutes=1.5, keep_up=False, console=Console(file=out, width=120),
                  report_root=tmp_path / "reports")
    assert rc == 0, out.getvalue()[-4000:]
    (report,) = list((tmp_path / "reports").glob("*/report.md"))
    r = json.loads((report.parent / "demo.json").read_text())
    c = r["clients"]
    assert c["errors"] == 0 and c["sessions"] > 10 and c["impressions"] > 100
    assert r["exposures_logged"] >= c["impressions"]  # every served item was logged (viewed ones are a subset)
    assert r["get_feed_client"]["get_feed_calls"] > 10 and r["get_feed_client"]["p99_ms"] > 0
    assert r["freshness_ms"]["probes"] >= 3 and r["freshness_ms"]["p50"] is not None
    assert r["stage_latency_ms"]["HeavyRankerScorer"]["count"] > 0
    assert (r["online_learning"]["progress"]["examples"] or 0) > 0  # the learner joined exposures and engagements
    assert r["feature_job"]["post_events"] > 0
    ev = r["event_log"]  # the jobs read the run's own topic through Flink's KafkaSource
    assert ev["transport"] == "kafka" and ev["topic"].startswith("engagements-demo-") and ev["messages"] > 0
    assert ev["groups"]["feedrank-features"]["committed"] > 0  # offsets committed on checkpoints
    assert r["rerank_constraints"]["author_runs_ok"] == 1.0
    assert (report.parent / "utility_ctr_over_time.png").stat().st_size > 1000
    assert "feedrank demo" in report.read_text()
    # the compressed daily cycle ran on what this run's FeedService logged, through the lake job
    dc = r["daily_cycle"]
    assert dc["lake_exposures"] >= r["exposures_logged"] > 0
    assert set(dc["steps"]) >= {"compact the lake", "batch features", "training set", "retrain heavy", "shadow start"}
    assert dc["steps"]["training set"]["result"]["counts"]["missing_features"] == 0
    assert dc["shadow"]["candidate"] == dc["candidate"] and dc["shadow"]["pages"] > 0
    assert dc["shadow"]["decision"] in ("promote", "reject", "waiting")
    assert "Compressed daily cycle" in report.read_text()
