"""Candidate sources: follow graph (fan-out cache + lazy celebrity fan-out), ANN interest
retrieval, trending and sponsored posts. The funnel runs them in parallel, each within
``candidates.source_timeout_ms``; a late or failing source is left out and the response
is flagged degraded."""

from __future__ import annotations

from typing import Any

import numpy as np

from core.units import DAY_MS, HOUR_MS

from serving.components import AD, IN_NETWORK, OUT_OF_NETWORK, TRENDING, Candidates, CandidateSource, Query
from serving.state import EMPTY_CACHE



def _published(state: Any, ids: np.ndarray, now_ms: int) -> np.ndarray:
    """Known posts already published at ``now_ms`` (a cache may hold ids a replica has not applied yet)."""
    ids = ids[(ids >= 0)]
    ok = state.catalog.known(ids)
    ids = ids[ok]
    return ids[state.catalog.published_ms[ids] <= now_ms]


class FollowGraphSource(CandidateSource):
    """Recent posts of followed authors: the Redis fan-out cache, plus celebrities' posts read at request time."""

    source_code = IN_NETWORK

    def fetch(self, query: Query, state: Any) -> Candidates:
        u, c = query.user, state.cfg.candidates
        cached = u.cached_candidates
        if cached is None:
            cached = state.rebuild_cache(u, query.now_ms)
            query.source_counts["follow_cache_miss"] = 1
        cached = cached[cached != EMPTY_CACHE]
        celebs = [a for a in u.following.tolist() if state.celebrity(a)]
        lazy = state.catalog.recent_by_authors(celebs, query.now_ms - int(c.follow_window_h * HOUR_MS), query.now_ms)
        ids = _published(state, np.unique(np.concatenate([cached, lazy])), query.now_ms)
        if ids.size > c.follow_max:
            ids = ids[np.argsort(-state.catalog.published_ms[ids], kind="stable")[: c.follow_max]]
        return Candidates(ids, np.full(ids.size, IN_NETWORK), ann=np.zeros(ids.size, dtype=np.float32))


class AnnSource(CandidateSource):
    """Interest-based candidates: the user embedding against the FAISS IVF index (~8K)."""

    source_code = OUT_OF_NETWORK

    def fetch(self, query: Query, state: Any) -> Candidates:
        emb = query.user.embedding
        if emb is None:
            query.degrade("no_user_embedding")
            return Candidates.empty()
        scores, ids = state.loader.search(emb, state.cfg.candidates.ann_k)
        keep = ids[0] >= 0
        ids, scores = ids[0][keep], scores[0][keep]
        ok = state.catalog.known(ids)
        ids, scores = ids[ok], scores[ok]
        ok = state.catalog.published_ms[ids] <= query.now_ms
        ids, scores = ids[ok], scores[ok]
        # The index scores (u / T) . p + recency * (day_p - day0): recover the cosine u . p the rankers
        # use, so the hydrator need not gather 8K embeddings again.
        idx = state.models.index
        day = state.catalog.published_ms[ids] / DAY_MS
        cosine = idx.temperature * (scores - idx.recency * (day - idx.day0))
        return Candidates(ids, np.full(ids.size, OUT_OF_NETWORK), ann=cosine.astype(np.float32),
                          has_ann=np.ones(ids.size, dtype=bool))


class TrendingSource(CandidateSource):
    """Posts with the highest recent click lift (recomputed in the background every second)."""

    source_code = TRENDING

    def fetch(self, query: Query, state: Any) -> Candidates:
        ids = _published(state, state.trending[: state.cfg.candidates.trending_k], query.now_ms)
        return Candidates(ids, np.full(ids.size, TRENDING), ann=np.zeros(ids.size, dtype=np.float32))


class AdSource(CandidateSource):
    """The sponsored inventory (post -> bid); ranked later by bid x pCTR."""

    source_code = AD

    def fetch(self, query: Query, state: Any) -> Candidates:
        if not state.ads or query.params.rerank.ad_every == 0:
            return Candidates.empty()
        ids = np.fromiter(state.ads.keys(), dtype=np.int64, count=len(state.ads))
        bids = np.fromiter(state.ads.values(), dtype=np.float32, count=len(state.ads))
        ok = state.catalog.known(ids)
        ids, bids = ids[ok], bids[ok]
        seen = query.user.seen  # frequency cap: an ad is shown to a user once, so the next ads move up
        ok = (state.catalog.published_ms[ids] <= query.now_ms) & ~np.isin(ids, seen)
        ids, bids = ids[ok], bids[ok]
        top = np.argsort(-bids, kind="stable")[: state.cfg.candidates.ads_per_request]
        return Candidates(ids[top], np.full(top.size, AD), ann=np.zeros(top.size, dtype=np.float32), bid=bids[top])

