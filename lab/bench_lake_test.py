"""`feedrank bench lake` end to end on a small workload (file:// log): the lake job reads every event,
commits every exposure, and the training set it feeds has one row per exposure with the workload's
positives."""

from __future__ import annotations

import pytest

from lab.bench_lake import bench_lake, lake_workload

pytestmark = [pytest.mark.slow, pytest.mark.flink]


def test_bench_lake_counts_what_it_wrote(make_cfg):
    cfg = make_cfg()
    events, exposures = lake_workload(60)
    clicks = sum(1 for e in events if e.type == "engagement" and e.action == "click")
    res = bench_lake(cfg, pages=60, events="file", workers=1)
    assert res["events"] == len(events) and res["exposures"] == exposures == 1200
    rate = res["lake_job"]["events_per_s"]
    assert (rate is None or rate > 0) and res["lake_job"]["files"] > 0 and res["lake_job"]["parquet_mb"] > 0
    c = res["training_set"]["counts"]
    assert c["exposures"] == 1200 and c["examples_positive"] == clicks and c["missing_features"] == 0
    assert res["training_set"]["rows"] == c["kept_positive"] + c["kept_negative"]
