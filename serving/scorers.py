"""Scorers: each declares the columns it reads and writes.

Score adjustments (fatigue, policy, original boost) are multiplicative on a score that
may be negative (the negative head weighs < 0), so a demotion divides a negative score
instead of multiplying it: a demoted post always moves down.
"""

from __future__ import annotations

import numpy as np

from core.schema import HEAD_NAMES
from core.units import HOUR_MS
from serving.components import AD, Candidates, FunnelContext, Query, Scorer

CLICK = HEAD_NAMES.index("click")


def scale(score: np.ndarray, factor: np.ndarray | float) -> np.ndarray:
    """Move ``score`` towards worse (factor < 1) or better (factor > 1), whatever its sign."""
    factor = np.maximum(np.asarray(factor, dtype=np.float64), 1e-6)
    return np.where(score >= 0, score * factor, score / factor).astype(np.float32)


class AnnRecencyScorer(Scorer):
    """The light ranker's stand-in when a request has no time left for the light features: the ANN
    similarity, less a tenth per hour of age (ads kept for the re-ranker, as the light ranker does)."""

    reads = ("ann",)
    writes = ("light_score",)

    def score(self, query: Query, ctx: FunnelContext, cands: Candidates) -> None:
        age_h = np.maximum(query.now_ms - ctx.catalog.published_ms[cands.ids], 0) / HOUR_MS
        s = (cands["ann"] - 0.1 * np.log1p(age_h)).astype(np.float32)
        s[cands.source == AD] = np.inf
        cands["light_score"] = s


class LightScoreScorer(Scorer):
    """The heavy ranker's stand-in when a request has no time left for it: the light ranker's P(click)
    (the sigmoid of its logit) as the click head, the other heads 0, score = the click weight x P(click);
    ads, which the light ranker does not score, bid x the organic rows' mean P(click)."""

    reads = ("light_score",)
    writes = ("heads", "score")

    def score(self, query: Query, ctx: FunnelContext, cands: Candidates) -> None:
        p = np.zeros((len(cands), len(HEAD_NAMES)), dtype=np.float32)
        ad = cands.source == AD
        logit = np.where(ad, 0.0, cands["light_score"]).astype(np.float64)
        click = 1.0 / (1.0 + np.exp(-np.clip(logit, -30, 30)))
        click[ad] = click[~ad].mean() if (~ad).any() else 0.0
        p[:, CLICK] = click
        score = p[:, CLICK] * np.float32(query.params.head_weights[CLICK])
        if ad.any():
            score[ad] = cands["bid"][ad] * p[ad, CLICK]
        cands["heads"] = p
        cands["score"] = score.astype(np.float32)


class LightRankerScorer(Scorer):
    """Logistic regression over the light features (10K rows, well under a millisecond)."""

    reads = ("x_light",)
    writes = ("light_score",)
    deadline_fallback = AnnRecencyScorer()

    def score(self, query: Query, ctx: FunnelContext, cands: Candidates) -> None:
        s = ctx.models.light.score(cands["x_light"]).astype(np.float32)
        s[cands.source == AD] = np.inf  # ads are ranked by bid x pCTR later, never cut by the light ranker
        cands["light_score"] = s


class HeavyRankerScorer(Scorer):
    """Multi-task heavy ranker: P(head) for every head in one batched forward pass; score = weighted sum
    (ads: bid x P(click))."""

    reads = ("x",)     # and an ad's "bid" (AdSource)
    writes = ("heads", "heavy_score", "score")  # heavy_score: before the adjustments below change score
    deadline_fallback = LightScoreScorer()

    def score(self, query: Query, ctx: FunnelContext, cands: Candidates) -> None:
        from serving.model_loader import score_heavy

        models = ctx.models
        model = models.heavy
        query.model_version = models.heavy_version
        if query.params.heavy_version and query.params.heavy_version != models.heavy_version:
            try:
                model = ctx.loader.heavy_for(query.params.heavy_version)
                query.model_version = query.params.heavy_version
            except Exception:  # noqa: BLE001 - a pinned version that cannot load falls back to current
                query.degrade("pinned_model_unavailable")
        p = score_heavy(model, cands["x"]) if len(cands) else np.zeros((0, len(HEAD_NAMES)), dtype=np.float32)
        w = np.asarray(query.params.head_weights, dtype=np.float32)
        score = p @ w
        ad = cands.source == AD
        if ad.any():
            score[ad] = cands["bid"][ad] * p[ad, CLICK]
        cands["heads"] = p.astype(np.float32)
        cands["heavy_score"] = score.astype(np.float32)
        cands["score"] = cands["heavy_score"].copy()


class FeedbackFatigueScorer(Scorer):
    """Suppresses authors and topics similar to the user's negative feedback; decays with a half-life."""

    reads = ("score",)
    writes = ("score", "fatigue")

    def score(self, query: Query, ctx: FunnelContext, cands: Candidates) -> None:
        u = query.user
        f = np.zeros(len(cands), dtype=np.float32)
        if u.fatigue_authors or u.fatigue_topics:
            authors, topics = ctx.catalog.author[cands.ids], ctx.catalog.topic[cands.ids]
            fa = np.array([u.fatigue_authors.get(a, 0.0) for a in authors.tolist()], dtype=np.float32)
            ft = np.array([u.fatigue_topics.get(t, 0.0) for t in topics.tolist()], dtype=np.float32)
            f = np.maximum(fa, ft)
            cands["score"] = scale(cands["score"], 1.0 - query.params.rerank.fatigue_strength * f)
        cands["fatigue"] = f


class AuthorDiversityScorer(Scorer):
    """An author's k-th best candidate (k = 0, 1, ...) is scaled by ``decay ** k`` (never below ``floor``), so
    one prolific author cannot fill the pool the re-ranker lays pages out from."""

    reads = ("score",)
    writes = ("score",)

    def score(self, query: Query, ctx: FunnelContext, cands: Candidates) -> None:
        rr = query.params.rerank
        if rr.author_diversity_decay >= 1.0 or not len(cands):
            return
        author = ctx.catalog.author[cands.ids]
        s = cands["score"]
        order = np.lexsort((-s, author))  # by author, best first
        a_sorted = author[order]
        start = np.r_[0, np.flatnonzero(np.diff(a_sorted)) + 1]
        rank = np.arange(order.size) - np.repeat(start, np.diff(np.r_[start, order.size]))
        factor = np.empty(order.size)
        factor[order] = np.maximum(rr.author_diversity_decay ** rank, rr.author_diversity_floor)
        organic = cands.source != AD
        cands["score"] = np.where(organic, scale(s, factor), s)


class PolicyDemotionScorer(Scorer):
    """Policy-flagged posts (when not removed by PolicyFilter) scaled by ``rerank.policy_demotion``."""

    reads = ("score",)
    writes = ("score",)

    def score(self, query: Query, ctx: FunnelContext, cands: Candidates) -> None:
        flagged = ctx.catalog.flagged[cands.ids]
        if flagged.any():
            cands["score"] = scale(cands["score"], np.where(flagged, query.params.rerank.policy_demotion, 1.0))


class OriginalBoostScorer(Scorer):
    """Original posts (not reposts) scaled by ``rerank.original_boost``."""

    reads = ("score",)
    writes = ("score",)

    def score(self, query: Query, ctx: FunnelContext, cands: Candidates) -> None:
        original = ctx.catalog.original[cands.ids] & (cands.source != AD)
        cands["score"] = scale(cands["score"], np.where(original, query.params.rerank.original_boost, 1.0))


class RecencyScorer(Scorer):
    """FOLLOWING feed: reverse-chronological, no ML."""

    writes = ("score",)

    def score(self, query: Query, ctx: FunnelContext, cands: Candidates) -> None:
        cands["score"] = ((ctx.catalog.published_ms[cands.ids] - query.now_ms) / HOUR_MS).astype(np.float32)  # hours
