"""The re-ranker's rules on many random candidate sets (in-memory catalog and stats)."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np
import pytest

from core.config import load_config
from serving.catalog import PostCatalog
from serving.components import AD, IN_NETWORK, OUT_OF_NETWORK, Candidates, Query
from serving.ab_tests import Params
from serving.selectors import ChronologicalSelector, RerankSelector, TopKSelector

NOW = 1_768_780_800_000


def _state(n: int, rng: np.random.Generator, n_authors: int) -> SimpleNamespace:
    cat = PostCatalog(capacity=n)
    ages = rng.exponential(10.0, n) * 3_600_000
    cat.load(np.arange(n), rng.integers(0, n_authors, n), rng.integers(0, 24, n), rng.integers(0, 3, n),
             rng.random(n) > 0.2, rng.random(n) < 0.02, (NOW - ages).astype(np.int64))
    stats = SimpleNamespace(ints=rng.integers(0, 200, (n, 9)), lock=__import__("threading").Lock())
    cfg = load_config(env={})
    return SimpleNamespace(catalog=cat, stats=stats, cfg=cfg)


def _query(cfg, feed="home", limit=20) -> Query:
    return Query("r", 1, feed, NOW, limit, Params(tuple(cfg.heads.weights().values()), cfg.rerank), {},
                 time.monotonic() + 1)


@pytest.mark.parametrize("seed", range(12))
def test_every_page_satisfies_the_rules(seed):
    rng = np.random.default_rng(seed)
    n = 400
    n_authors = int(rng.choice([5, 20, 200]))  # few authors: diversity is hard
    state = _state(n, rng, n_authors)
    rr = state.cfg.rerank
    ids = rng.choice(n, 90, replace=False)
    src = np.where(rng.random(90) < float(rng.choice([0.05, 0.5, 0.9])), OUT_OF_NETWORK, IN_NETWORK)
    src[:8] = AD
    cands = Candidates(ids, src, score=rng.normal(size=90).astype(np.float32),
                       light_score=rng.normal(size=90).astype(np.float32), bid=rng.random(90).astype(np.float32))
    q = _query(state.cfg)
    out = RerankSelector(ads=True, out_of_network=True).select(q, state, TopKSelector("score", "heavy_k", reserve_quotas=True, out_of_network=True).select(q, state, cands))
    assert len(set(out.ids.tolist())) == len(out)
    authors = state.catalog.author[out.ids]
    pos = out["position"]
    assert pos.tolist() == list(range(1, len(out) + 1))
    is_ad = out.source == AD
    ads_left = int((src == AD).sum())
    for p, a in zip(pos, is_ad):
        if p % rr.ad_every == 0 and ads_left:
            assert a, f"slot {p} must be an ad"
            ads_left -= 1
        elif p % rr.ad_every:
            assert not a
    # author runs: never more than max_consecutive (the ranking ends first)
    for i in range(len(out) - rr.max_consecutive_author):
        assert len(set(authors[i: i + rr.max_consecutive_author + 1].tolist())) > 1
    limit = 20
    for start in range(0, len(out) - limit + 1, limit):  # full pages
        page = out.take(np.arange(start, start + limit))
        organic = page.source != AD
        oon = organic & (page.source != IN_NETWORK)
        avail_oon = int(((cands.source != AD) & (cands.source != IN_NETWORK)).sum())
        if avail_oon >= (start // limit + 1) * math.ceil(rr.min_out_of_network * limit):
            assert oon.sum() >= math.ceil(rr.min_out_of_network * limit)
        fresh = (NOW - state.catalog.published_ms[page.ids]) <= rr.fresh_hours * 3_600_000
        all_fresh = int(((NOW - state.catalog.published_ms[cands.ids]) <= rr.fresh_hours * 3_600_000).sum())
        if start == 0 and all_fresh >= 3 * math.ceil(rr.fresh_fraction * limit):
            assert (fresh & organic).sum() >= math.ceil(rr.fresh_fraction * limit) - 1  # one slot may go to a quota clash


def test_following_feed_is_chronological_and_untouched():
    rng = np.random.default_rng(0)
    state = _state(100, rng, 2)
    ids = np.arange(50)
    c = Candidates(ids, np.full(50, IN_NETWORK), score=(state.catalog.published_ms[ids] - NOW).astype(np.float32))
    out = ChronologicalSelector().select(_query(state.cfg, "following"), state, c)
    assert np.all(np.diff(state.catalog.published_ms[out.ids]) <= 0)


def test_exploration_slot_goes_to_the_best_cold_post_by_light_score():
    rng = np.random.default_rng(1)
    state = _state(200, rng, 100)
    state.stats.ints[:, 0] = 500           # everything has history...
    cold = [7, 8, 9]
    state.catalog.published_ms[cold] = NOW - 60_000
    state.stats.ints[cold, 0] = 0          # ...except three brand-new posts
    ids = np.arange(60)
    score = np.linspace(10, 1, 60).astype(np.float32)
    score[cold] = -5                      # the heavy ranker dislikes them (no history)
    light = np.zeros(60, dtype=np.float32)
    light[8] = 3.0
    c = Candidates(ids, np.full(60, OUT_OF_NETWORK), score=score, light_score=light)
    out = RerankSelector(ads=True, out_of_network=True).select(_query(state.cfg), state, c)
    first_page = out.ids[:20].tolist()
    assert 8 in first_page and 7 not in first_page and 9 not in first_page
    assert "exploration" in out["reasons"][first_page.index(8)]


def test_author_diversity_discount_and_the_ranking_ends_before_breaking_a_rule():
    from serving.scorers import AuthorDiversityScorer

    rng = np.random.default_rng(3)
    state = _state(100, rng, 10)
    state.catalog.author[:60] = 7          # one prolific author with the 60 best-scored posts
    ids = np.arange(80)
    score = np.linspace(10, 1, 80).astype(np.float32)
    c = Candidates(ids, np.full(80, OUT_OF_NETWORK), score=score.copy())
    q = _query(state.cfg)
    AuthorDiversityScorer().score(q, state, c)
    rr = state.cfg.rerank
    assert c["score"][0] == score[0] and c["score"][1] == pytest.approx(score[1] * rr.author_diversity_decay)
    assert c["score"][5] == pytest.approx(score[5] * rr.author_diversity_floor)  # floored
    assert c["score"][60] == score[60]  # another author's best is untouched
    out = RerankSelector(ads=True, out_of_network=True).select(q, state, c)
    a = state.catalog.author[out.ids]
    runs = [len(r) for r in "".join("x" if v == 7 else "." for v in a).split(".") if r]
    assert max(runs) <= rr.max_consecutive_author
    assert len(out) >= q.limit and len(out) < 80  # ended when only the prolific author was left
