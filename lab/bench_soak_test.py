"""`feedrank bench soak`, shortened: 30 s of GetFeed + SubmitSignals against `feedrank serve --world`
(two workers) on a tiny world; the signals are about what was served, so the server accepts them."""

from __future__ import annotations

import json
import os

import pytest

from core.config import load_config
from core.services import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_cfg_and_world(tmp_path_factory):
    """A tiny world with tiny trained models (as serving/conftest.py's served_world)."""
    from models.store import ModelStore
    from models.train import train_all
    from serving.conftest import TINY
    from serving.edge import embedded_auth
    from sim.generate import generate

    root = tmp_path_factory.mktemp("soak")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
    env.update(TINY, **embedded_auth(), FEEDRANK_PATHS_DATA_DIR=str(root / "var"),
               FEEDRANK_EVENTS="file://" + str(root / "var" / "events"),
               FEEDRANK_MODEL_STORE="file://" + str(root / "var" / "models"),
               FEEDRANK_REDIS=f"redis://127.0.0.1:{free_port()}/0", FEEDRANK_FLINK_REST_PORT=str(free_port()))
    cfg = load_config(env)
    wdir = root / "world"
    generate(cfg, "small", 5, wdir)
    train_all(cfg, str(wdir), "all", store=ModelStore.from_config(cfg), heavy_rows=30_000, tt_epochs=2, heavy_epochs=2)
    return cfg, wdir, root


def test_a_short_soak_samples_memory_accepts_the_signals_and_answers_only_ok(tiny_cfg_and_world):
    from lab.bench_soak import bench_soak, write_soak

    cfg, wdir, root = tiny_cfg_and_world
    res = bench_soak(cfg, minutes=0.5, getfeed_rps=10.0, signals_rps=5.0, workers=2, world_dir=wdir, sample_s=5.0)

    assert res["warmup"]["seconds"] == 10.0 and "first third" in res["warmup"]["rule"]
    samples = res["samples"]
    assert len(samples) >= 5 and samples[-1]["t_s"] >= 29
    assert set(samples[-1]["rss_mb"]) == {"worker0", "worker1", "supervisor"}
    assert all(v and v > 50 for v in samples[-1]["rss_mb"].values())  # each worker holds models and the world
    assert all(v > 0 for v in samples[-1]["ranking_cache_mb"].values())  # the load reached every worker
    feed, sig = res["rpcs"]["GetFeed"], res["rpcs"]["SubmitSignals"]
    assert feed["requests"] == 300 and feed["codes"] == {"OK": 300}
    assert sig["requests"] + sig["calls_skipped_nothing_served"] == 140 and sig["calls_skipped_nothing_served"] <= 5
    assert res["errors"] == {"total": 0, "by_rpc": {"GetFeed": 0, "SubmitSignals": 0}}
    assert res["signals"]["accepted"] > 0
    assert res["signals"]["accepted"] + sum(res["signals"]["dropped"].values()) == res["signals"]["sent"]
    assert res["signals"]["dropped"].get("not_served", 0) == 0  # every signal is about a served post
    assert res["goal"] == {"rss_growth_max": 0.05, "errors": 0}
    g = res["rss_growth_after_warmup"]["total"]
    assert res["passed"]["rss_growth"] == (g <= 0.05) and res["passed"]["errors"]

    out = root / "results"
    path, png = write_soak(res, out_dir=out)
    assert path.parent == out and path.name.startswith("soak-") and path.suffix == ".json"
    assert png == path.with_suffix(".png") and png.stat().st_size > 5000
    assert json.loads(path.read_text())["plot"] == png.name


def test_bench_serve_reports_retrieval_recall_against_exact_search_and_each_level_verdict(tiny_cfg_and_world):
    from lab.bench_serve import bench_serve

    cfg, wdir, root = tiny_cfg_and_world
    res = bench_serve(cfg, "small", (10.0,), seconds=5.0, world_dir=wdir, workers=1)

    rc = res["retrieval"]["recall"]
    assert rc["k"] == cfg.candidates.ann_k and rc["queries"] == 100 and rc["nprobe"] == res["retrieval"]["nprobe"]
    assert rc["nlist"] == res["retrieval"]["nlist"] == cfg.retrieval.nlist  # the index the server loaded
    by_nprobe = {t["nprobe"]: t["recall"] for t in rc["nprobe_sweep"]}
    assert rc["recall_at_k"] == by_nprobe[rc["nprobe"]] and rc["met"] == (rc["recall_at_k"] >= 0.95)
    # probing every list is exact search: the bench's queries and its exact reference agree with the index
    exhaustive = [r for n, r in by_nprobe.items() if n >= rc["nlist"]]
    assert exhaustive and all(r >= 0.999 for r in exhaustive)
    level = res["levels"][0]
    assert level["requests"] == 50 and level["codes"] == {"OK": 50} and level["degraded"] == 0
    assert level["goal"]["met"] == (level["latency_ms"]["p99"] <= level["goal"]["p99_goal_ms"])
