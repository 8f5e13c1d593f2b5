"""The daily cycle on a seeded lake, against a real Redis and model store: batch features materialised,
a training set built, the heavy ranker retrained and published as a candidate (not promoted), and its
shadow scoring started; a second cycle first decides the first one's shadow."""

from __future__ import annotations

import pytest

from features.connection import redis_client
from features.feast_repo import BATCH_FEATURES_KEY
from models import shadow
from models.lake_training_test import _seed_lake
from models.store import ModelStore
from core.schema import HEAVY_FEATURES, schema_hash
from runtime import stack
from runtime.daily import daily_cycle

pytestmark = pytest.mark.slow
T = 1_767_571_200_000


def test_daily_cycle_retrains_into_a_shadow_candidate(make_cfg):
    cfg = make_cfg(FEEDRANK_SHADOW_WINDOW_S="60", FEEDRANK_SHADOW_MIN_PAGES="1", FEEDRANK_LAKE_COMPACT_MIN_AGE_S="0")
    stack.up(cfg)
    try:
        store = ModelStore.from_config(cfg)
        serving = store.publish("heavy", {"w": b"0"}, promote=True).version
        _seed_lake(cfg, 1500, schema_hash(HEAVY_FEATURES))
        rep = daily_cycle(cfg, "2026-01-05", 1, workers=1, say=lambda s: None, now_ms=T)
        assert list(rep["steps"]) == ["compact the lake", "batch features", "training set", "retrain heavy", "shadow start"]
        # the seeded files of the day, one per table and hour, merged into one .parquet file per partition
        compacted = rep["steps"]["compact the lake"]["result"]
        assert compacted["partitions"] > 0 and compacted["files_merged"] == compacted["partitions"]
        cand = rep["candidate"]
        assert store.current("heavy") == serving and cand in store.versions("heavy")
        assert store.meta("heavy", cand).data_window["source"] == "lake"
        assert shadow.active(cfg)["version"] == cand
        assert redis_client(cfg).get(BATCH_FEATURES_KEY).startswith(b"2026-01-05:")
        # pages a minute apart from midnight: 1,440 of the 1,500 pages fall on the window's one day
        assert rep["steps"]["training set"]["result"]["counts"]["exposures"] == 14_400
        # the next day: the shadow saw no traffic, so after its window it is decided first (no pages: waiting)
        rep2 = daily_cycle(cfg, "2026-01-05", 1, workers=1, say=lambda s: None, now_ms=T + 120_000)
        assert rep2["steps"]["shadow decision"]["result"]["decision"] == "waiting"
        assert shadow.active(cfg)["version"] == rep2["candidate"] != cand  # replaced by the new candidate
    finally:
        stack.down(cfg)
