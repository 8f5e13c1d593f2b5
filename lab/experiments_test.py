"""Feed variants, position-bias arms and the trend-shift arms on the simulator's ground truth, run end to
end on a tiny world (real server per variant; the real PyFlink jobs in the trend-shift arms)."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.flink]


def test_variants_run_on_the_same_users_and_report_measured_figures(make_cfg, tmp_path):
    from models.store import ModelStore
    from models.train import train_all
    from lab.experiments import run_experiments
    from sim.generate import generate

    cfg = make_cfg(FEEDRANK_SIM_SCALES_SMALL_USERS="1500", FEEDRANK_SIM_SCALES_SMALL_CREATORS="300",
                   FEEDRANK_SIM_SCALES_SMALL_POSTS="8000", FEEDRANK_SIM_SCALES_SMALL_IMPRESSIONS="200000",
                   FEEDRANK_RETRIEVAL_NLIST="64", FEEDRANK_RETRIEVAL_NPROBE="32",
                   FEEDRANK_CANDIDATES_SOURCE_TIMEOUT_MS="250")
    generate(cfg, "small", 5, tmp_path / "w")
    train_all(cfg, str(tmp_path / "w"), "all", store=ModelStore.from_config(cfg), heavy_rows=30_000, tt_epochs=2,
              heavy_epochs=2)
    out = tmp_path / "exp" / "experiments.json"
    res = run_experiments(cfg, tmp_path / "w", out, users=40, minutes=20.0, seed=3,
                          variants=("V0_chronological", "V1_follow_graph_rankers", "V2_full_funnel",
                                    "V2_without_reranker"), trend_minutes=12.0, speed=12.0,
                          options={"position_bias": {"seeds": (0, 1), "heavy_rows": 30_000, "epochs": 2,
                                                     "n_sessions": 100},
                                   "trend_shift": {"bucket_min": 3.0, "arms": ("frozen", "online")},
                                   "lake_retraining": {"collect_users": 80, "epochs": 2}})
    v = res["variants"]
    assert json.loads(out.read_text())["variants"].keys() == v.keys()
    for name, r in v.items():
        assert r["errors"] == 0 and r["pages"] > 5 and r["impressions"] > 0, (name, r)
    # every variant saw the same people: their first sessions start identically
    assert len({r["sessions"] for r in v.values()}) <= 3
    assert v["V0_chronological"]["discovery_share"] == 0.0  # follow graph only
    assert v["V1_follow_graph_rankers"]["discovery_share"] < 0.05
    assert v["V2_full_funnel"]["discovery_share"] >= 0.2  # the re-ranker's out-of-network rule
    assert (out.parent / "experiments.png").stat().st_size > 1000 and (out.parent / "report.md").exists()
    # every variant reads as a share of the oracle ceilings, which bound it
    for name, r in v.items():
        assert 0 < r["share_of_oracle_all"] <= r["share_of_oracle_order"] <= 1, (name, r)
        assert r["oracle_order_page_expected_utility"] <= r["oracle_all_page_expected_utility"]

    # position bias: both arms trained on the same rows, evaluated offline and served
    pb = res["position_bias"]
    assert len(pb["offline_ndcg@20"]["corrected"]["per_seed"]) == 2
    for arm in ("corrected", "naive"):
        assert 0 < pb["offline_ndcg@20"][arm]["mean"] <= 1
        assert pb["online"][arm]["errors"] == 0 and pb["online"][arm]["pages"] > 5
    # trend shift: the learner ran (and only) in the online arm; both arms saw the shifted topic's truth change
    ts = res["trend_shift"]
    on, off = ts["arms"]["online"], ts["arms"]["frozen"]
    assert on["errors"] == 0 and off["errors"] == 0 and on["sessions"] > 10
    assert (on["learner"]["examples"] or 0) > 0 and off["learner"] is None
    assert [x["t_min"] for x in on["timeline"]][:2] == [1.5, 4.5]
    assert on["after_shift"]["page_expected_utility"] is not None
    for arm in (on, off):
        p = arm["after_shift_pages"]
        assert 0 < p["share_of_oracle_all"] <= p["share_of_oracle_order"] <= 1, p
    for k in ("V2_beats_V1_on_total_utility", "V2_beats_V0_on_utility_per_examined",
              "corrected_beats_naive_on_offline_ndcg", "online_beats_frozen_after_shift"):
        assert isinstance(res["checks"][k], bool)
    # retrained from the FeedService's own logs: every served exposure reached the lake through the lake job,
    # the rankers were trained on it, and both arms served the same users
    lr = res["lake_retraining"]
    assert lr["collection"]["lake_exposures"] == lr["collection"]["served"]["served"] > 1000
    assert lr["training_set"]["counts"]["missing_features"] == 0 and lr["training_set"]["counts"]["examples_positive"] > 20
    assert lr["retrained"]["heavy"]["version"] != lr["retrained"]["light"]["version"]
    assert lr["arms"]["logging_policy"]["errors"] == 0 and lr["arms"]["lake_retrained"]["errors"] == 0
    c = lr["lake_retrained_minus_logging_policy"]
    assert c["users"] <= 40 and all(c[m]["difference_se"] > 0 for m in ("utility_per_examined", "ctr", "utility_total"))
    report = (out.parent / "report.md").read_text()
    assert "Position bias" in report and "Trend shift" in report and "own logs" in report
    assert (out.parent / "position_bias.png").stat().st_size > 1000 and (out.parent / "trend_shift.png").stat().st_size > 1000
