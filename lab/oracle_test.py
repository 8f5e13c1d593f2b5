"""The oracle ceiling on a small generated world: its order and its corpus bound what was served."""

from __future__ import annotations

import numpy as np

from core.config import load_config
from lab.oracle import OracleCeiling, shares
from sim.generate import WorldSpec, generate_world


def test_oracle_bounds_the_served_page_and_skips_what_the_user_was_served():
    cfg = load_config(env={"FEEDRANK_SIM_SCALES_SMALL_USERS": "500", "FEEDRANK_SIM_SCALES_SMALL_CREATORS": "100",
                           "FEEDRANK_SIM_SCALES_SMALL_POSTS": "3000", "FEEDRANK_SIM_SCALES_SMALL_IMPRESSIONS": "2000"})
    world = generate_world(WorldSpec.from_config(cfg, "small", 3))[0]
    oracle, now, user = OracleCeiling(world), world.end_ms, 7
    rng = np.random.default_rng(0)
    eligible = np.flatnonzero((world.post_ts <= now) & (world.post_author != user) & ~world.post_flagged)
    served = rng.choice(eligible, 20, replace=False)
    pos = np.arange(1, 21)
    p = oracle.page(user, served, pos, now)
    exam = world.examination_prob(pos)
    util = world.true_utility(user, served, now)
    assert np.isclose(p["expected_utility"], (util * exam).sum())
    assert np.isclose(p["oracle_order_expected_utility"], (np.sort(util)[::-1] * exam).sum())
    best = np.sort(world.true_utility(user, eligible, now))[::-1][:20]
    assert np.isclose(p["oracle_all_expected_utility"], (best * exam).sum())
    assert p["expected_utility"] <= p["oracle_order_expected_utility"] < p["oracle_all_expected_utility"]
    # the corpus oracle's best posts are served now: the next page's oracle may not use them again
    top = world.oracle_ranking(user, eligible, now, k=20)
    p2 = oracle.page(user, top, pos, now)
    assert np.isclose(p2["oracle_all_expected_utility"], p["oracle_all_expected_utility"])  # the page itself is the best
    p3 = oracle.page(user, served[:5], pos[:5], now)
    rest = np.setdiff1d(eligible, np.union1d(top, served))
    best3 = np.sort(world.true_utility(user, np.union1d(rest, served[:5]), now))[::-1][:5]
    assert np.isclose(p3["oracle_all_expected_utility"], (best3 * exam[:5]).sum())
    s = shares([p, p2])
    assert s["share_of_oracle_all"] == round((p["expected_utility"] + p2["expected_utility"])
                                             / (p["oracle_all_expected_utility"] + p2["oracle_all_expected_utility"]), 4)
