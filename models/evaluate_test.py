"""Metric functions, and train -> publish -> evaluate end to end on a tiny world."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.evaluate import auc, calibration, evaluate_sim, ndcg_at_k


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = rng.normal(size=300) + y
    s[:20] = s[0]  # ties
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert auc(y, s) == pytest.approx(np.mean(pairs))


def test_ndcg_and_calibration():
    gains = np.array([3.0, 2.0, 0.0, 1.0])
    assert ndcg_at_k(gains, gains, 4) == pytest.approx(1.0)
    assert ndcg_at_k(-gains, gains, 4) < 0.7
    c = calibration(np.array([0, 1, 0, 1.0]), np.array([0.1, 0.9, 0.2, 0.8]), bins=2)
    assert c["observed"] == [0.0, 1.0]


@pytest.mark.slow
def test_train_publish_evaluate_on_a_tiny_world(make_cfg, tmp_path):
    from models.store import ModelStore
    from sim.generate import generate
    from sim.world import World

    cfg = make_cfg(FEEDRANK_SIM_SCALES_SMALL_USERS="1500", FEEDRANK_SIM_SCALES_SMALL_CREATORS="300",
                   FEEDRANK_SIM_SCALES_SMALL_POSTS="8000", FEEDRANK_SIM_SCALES_SMALL_IMPRESSIONS="200000",
                   FEEDRANK_RETRIEVAL_NLIST="64")
    generate(cfg, "small", 11, tmp_path / "w")
    store = ModelStore.from_config(cfg)
    res = evaluate_sim(cfg, str(tmp_path / "w"), tmp_path / "eval" / "metrics.json", World.load(tmp_path / "w"),
                       heavy_rows=40_000,
                       n_queries=300, n_sessions=60, n_valid=20_000, store=store, tt_epochs=2, heavy_epochs=2)
    assert set(store.models()) == {"two_tower", "retrieval", "light", "heavy"}
    assert all(store.current(m) for m in store.models())
    assert store.meta("retrieval", store.current("retrieval")).parent == store.current("two_tower")
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["ndcg"] == res["ndcg"]
    for png in ("recall_at_k.png", "head_auc.png", "calibration.png", "position_bias.png", "ndcg.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 1000
    r = res["retrieval"]
    k = 1000  # of 8000 posts: small enough that neither method returns everything
    assert r["two_tower"][k] > r["popularity_train"][k]  # learned retrieval beats MostPop even when tiny
    assert res["ndcg"]["heavy"] > res["ndcg"]["random"] and res["ndcg"]["light"] > res["ndcg"]["random"]
    assert 0.5 < res["heads"]["heavy"]["auc"]["click"] < 1.0
