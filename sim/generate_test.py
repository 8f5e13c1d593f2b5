"""The simulated world: heavy-tailed follow graph, position bias, trend shift, determinism."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from sim.generate import WorldSpec, generate, generate_world
from sim.world import World


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from core.config import load_config

    cfg = load_config(env={})
    out = tmp_path_factory.mktemp("world")
    meta = generate(cfg, "small", 42, out)
    return cfg, out, meta, World.load(out)


def test_sizes_and_tables(small):
    cfg, out, meta, world = small
    assert (meta["users"], meta["posts"]) == (5000, 50_000)
    assert meta["impressions"] == 1_000_000
    for name in ("users", "posts", "follows", "impressions", "engagements"):
        t = pq.read_table(out / f"{name}.parquet")
        assert t.num_rows > 0 and "event_timestamp" in t.column_names  # usable as a Feast offline source
    posts = pq.read_table(out / "posts.parquet").to_pandas()
    assert set(posts.content_type) == {"text", "image", "video"}
    assert 0.15 < (~posts.is_original).mean() < 0.25
    assert 0.01 < posts.policy_flagged.mean() < 0.03
    reposts = posts[~posts.is_original]
    assert (reposts.original_post_id < reposts.post_id).all()
    assert posts.text.str.split().str.len().between(8, 24).all()


def test_follow_graph_is_heavy_tailed_with_celebrities(small):
    _, _, _, world = small
    indeg = world.follower_counts()[world.is_creator]
    assert indeg.max() >= 0.10 * world.n_users  # at least one celebrity reaches 10% of users
    assert indeg.max() / np.median(indeg) > 20
    top1 = np.sort(indeg)[::-1][: max(1, indeg.size // 100)].sum() / indeg.sum()
    assert top1 > 0.10  # the top 1% of creators hold over 10% of all follows
    # a Poisson graph with the same mean would have variance ~= mean; this one is far wider
    assert indeg.var() / indeg.mean() > 50


def test_click_rate_falls_with_position_as_the_examination_model_says(small):
    _, out, _, world = small
    imp = pq.read_table(out / "impressions.parquet", columns=["user_id", "post_id", "position", "ts"]).to_pandas()
    eng = pq.read_table(out / "engagements.parquet", columns=["action", "position"]).to_pandas()
    clicks = eng[eng.action == "click"].groupby("position").size()
    p_click = 1.0 / (1.0 + np.exp(-world.logit(imp.user_id.values, imp.post_id.values, imp.ts.values)))
    expected = np.bincount(imp.position.values, weights=world.examination_prob(imp.position.values) * p_click)[1:]
    obs, exp = clicks.values[:20], expected[:20]
    assert np.all(np.abs(obs - exp) < 4 * np.sqrt(exp)), obs / exp  # within 4 sigma of the model, per position
    ctr = clicks.values / imp.groupby("position").size().values
    assert np.all(np.diff(ctr[:10]) < 0)
    # relevance alone does not explain the fall: examination does
    naive = np.bincount(imp.position.values, weights=p_click)[1:21] / np.bincount(imp.position.values)[1:21]
    assert ctr[9] / ctr[0] < 0.5 * naive[9] / naive[0]


def test_trend_shift_changes_engagement_on_its_topic_only(small):
    _, out, _, world = small
    shift = world.trends[0]
    imp = pq.read_table(out / "impressions.parquet", columns=["request_id", "position", "post_id", "ts"]).to_pandas()
    eng = pq.read_table(out / "engagements.parquet", columns=["request_id", "position", "action"]).to_pandas()
    clicked = eng[eng.action == "click"].set_index(["request_id", "position"]).index
    imp["click"] = imp.set_index(["request_id", "position"]).index.isin(clicked)
    on_topic = world.post_topic[imp.post_id.values] == shift.topic
    after = imp.ts.values >= shift.at_ms
    ctr = lambda m: imp.click.values[m].mean()  # noqa: E731
    assert ctr(on_topic & after) / ctr(on_topic & ~after) > 1.5
    assert 0.85 < ctr(~on_topic & after) / ctr(~on_topic & ~after) < 1.15


def test_same_seed_same_tables_other_seed_other_tables(make_cfg):
    cfg = make_cfg(FEEDRANK_SIM_SCALES_SMALL_USERS="800", FEEDRANK_SIM_SCALES_SMALL_CREATORS="200",
                   FEEDRANK_SIM_SCALES_SMALL_POSTS="5000", FEEDRANK_SIM_SCALES_SMALL_IMPRESSIONS="40000")
    _, a = generate_world(WorldSpec.from_config(cfg, "small", 7))
    _, b = generate_world(WorldSpec.from_config(cfg, "small", 7))
    _, c = generate_world(WorldSpec.from_config(cfg, "small", 8))
    for name in a:
        assert a[name].equals(b[name]), name
    assert not a["posts"].equals(c["posts"]) and not a["engagements"].equals(c["engagements"])


def test_oracle_ranking_orders_by_true_utility(small):
    _, _, _, world = small
    posts = np.arange(0, 2000, 7)
    best = world.oracle_ranking(5, posts)
    u = world.true_utility(5, best)
    assert np.all(np.diff(u) <= 1e-12) and set(best) == set(posts)
    assert world.true_utility(np.array([1, 2]), np.array([3, 4])).shape == (2,)
