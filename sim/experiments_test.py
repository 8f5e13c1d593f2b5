"""Feed variants on the simulator's ground truth, run end to end on a tiny world (real server per variant)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_variants_run_on_the_same_users_and_report_measured_figures(make_cfg, tmp_path):
    from models.store import ModelStore
    from models.train import train_all
    from sim.experiments import run_experiments
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
                                    "V2_without_reranker"))
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
