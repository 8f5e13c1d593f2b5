"""Candidate sources: follow graph (fan-out cache + lazy celebrity fan-out), ANN interest
retrieval, trending and sponsored posts; and the two sources of the refresh and debug
pipelines (the cached ranking, the one post DebugRanking explains). The funnel runs them in
parallel, each within ``candidates.source_timeout_ms``; a late or failing fail-open source
is left out and the response is flagged degraded."""

from __future__ import annotations

import numpy as np

from core.units import DAY_MS, HOUR_MS

from serving.components import (AD, IN_NETWORK, OUT_OF_NETWORK, TRENDING, Candidates, CandidateSource, FunnelContext,
                                Query, member)
from serving.state import EMPTY_CACHE



def _published(ctx: FunnelContext, ids: np.ndarray, now_ms: int) -> np.ndarray:
    """Known posts already published at ``now_ms`` (a cache may hold ids a replica has not applied yet)."""
    ids = ids[(ids >= 0)]
    ok = ctx.catalog.known(ids)
    ids = ids[ok]
    return ids[ctx.catalog.published_ms[ids] <= now_ms]


class FollowGraphSource(CandidateSource):
    """Recent posts of followed authors: the Redis fan-out cache, plus celebrities' posts read at request time."""

    source_code = IN_NETWORK
    writes = ("ann",)

    def fetch(self, query: Query, ctx: FunnelContext) -> Candidates:
        u, c = query.user, ctx.cfg.candidates
        cached = u.cached_candidates
        if cached is None:
            cached = ctx.rebuild_cache(u, query.now_ms)
            query.source_counts["follow_cache_miss"] = 1
        cached = cached[cached != EMPTY_CACHE]
        celebs = [a for a in u.following.tolist() if ctx.celebrity(a)]
        lazy = ctx.catalog.recent_by_authors(celebs, query.now_ms - int(c.follow_window_h * HOUR_MS), query.now_ms)
        ids = _published(ctx, np.unique(np.concatenate([cached, lazy])), query.now_ms)
        # the cache may predate an unfollow (an edge removed on another replica or by the event stream): only
        # authors followed now are in network
        ids = ids[member(u.following, ctx.catalog.author[ids])]
        if ids.size > c.follow_max:
            ids = ids[np.argsort(-ctx.catalog.published_ms[ids], kind="stable")[: c.follow_max]]
        return Candidates(ids, np.full(ids.size, IN_NETWORK), ann=np.zeros(ids.size, dtype=np.float32))


class AnnSource(CandidateSource):
    """Interest-based candidates: the user embedding against the FAISS IVF index (~8K)."""

    source_code = OUT_OF_NETWORK
    writes = ("ann", "has_ann")

    def fetch(self, query: Query, ctx: FunnelContext) -> Candidates:
        emb = query.user.embedding
        if emb is None:
            query.degrade("no_user_embedding")
            return Candidates.empty()
        scores, ids = ctx.loader.search(emb, ctx.cfg.candidates.ann_k)
        keep = ids[0] >= 0
        ids, scores = ids[0][keep], scores[0][keep]
        ok = ctx.catalog.known(ids)
        ids, scores = ids[ok], scores[ok]
        ok = ctx.catalog.published_ms[ids] <= query.now_ms
        ids, scores = ids[ok], scores[ok]
        # The index scores (u / T) . p + recency * (day_p - day0): recover the cosine u . p the rankers
        # use, so the hydrator need not gather 8K embeddings again.
        idx = ctx.models.index
        day = ctx.catalog.published_ms[ids] / DAY_MS
        cosine = idx.temperature * (scores - idx.recency * (day - idx.day0))
        return Candidates(ids, np.full(ids.size, OUT_OF_NETWORK), ann=cosine.astype(np.float32),
                          has_ann=np.ones(ids.size, dtype=bool))


class TrendingSource(CandidateSource):
    """Posts with the highest recent click lift (recomputed in the background every second)."""

    source_code = TRENDING
    writes = ("ann",)

    def fetch(self, query: Query, ctx: FunnelContext) -> Candidates:
        ids = _published(ctx, ctx.trending[: ctx.cfg.candidates.trending_k], query.now_ms)
        return Candidates(ids, np.full(ids.size, TRENDING), ann=np.zeros(ids.size, dtype=np.float32))


class AdSource(CandidateSource):
    """The sponsored inventory (post -> bid); ranked later by bid x pCTR."""

    source_code = AD
    writes = ("ann", "bid")

    def fetch(self, query: Query, ctx: FunnelContext) -> Candidates:
        if not ctx.ads or query.params.rerank.ad_every == 0:
            return Candidates.empty()
        ids = np.fromiter(ctx.ads.keys(), dtype=np.int64, count=len(ctx.ads))
        bids = np.fromiter(ctx.ads.values(), dtype=np.float32, count=len(ctx.ads))
        ok = ctx.catalog.known(ids)
        ids, bids = ids[ok], bids[ok]
        seen = query.user.seen  # frequency cap: an ad is shown to a user once, so the next ads move up
        ok = (ctx.catalog.published_ms[ids] <= query.now_ms) & ~np.isin(ids, seen)
        ids, bids = ids[ok], bids[ok]
        top = np.argsort(-bids, kind="stable")[: ctx.cfg.candidates.ads_per_request]
        return Candidates(ids[top], np.full(top.size, AD), ann=np.zeros(top.size, dtype=np.float32), bid=bids[top])


class CachedRankingSource(CandidateSource):
    """A refresh: the ranking this user was served last for this feed type (``query.cached``), in its
    order, without its feature matrices (:mod:`serving.rankings`)."""

    writes = ("ann", "light_score", "heads", "score", "reasons", "position")

    def fetch(self, query: Query, ctx: FunnelContext) -> Candidates:
        if query.cached is None:
            raise ValueError("CachedRankingSource needs query.cached (the ranking to refresh)")
        return query.cached


class DebugPostSource(CandidateSource):
    """DebugRanking: the one post explained, with the source the traced ranking gave it and its bid when it
    is an ad, so its feature vector and head scores are computed whatever the funnel decided."""

    writes = ("ann", "bid")

    def fetch(self, query: Query, ctx: FunnelContext) -> Candidates:
        post = query.debug_post
        if post is None:
            raise ValueError("DebugPostSource needs query.debug_post")
        return Candidates(np.array([post]), np.array([query.debug_source]), ann=np.zeros(1, dtype=np.float32),
                          bid=np.array([ctx.ads.get(post, 0.0)], dtype=np.float32))
