"""The ranking vectors' formulas, written once: the light ranker's 20 features and the heavy
ranker's extra ones, in :mod:`core.schema` order, from raw per-row quantities.

Training (:class:`features.offline.History`, point-in-time counts from the logged history) and
serving (:mod:`serving.hydrators`, counts from the streaming feature job in process memory) both
call these, so a row with the same inputs gets the same vector; ``features/vectors_test.py``
checks it end to end. Each feature is clipped to its schema bounds, as the rankers expect.
"""

from __future__ import annotations

import numpy as np

from core.schema import HEAVY_EXTRA, LIGHT_FEATURES, N_CTYPES

PRIOR_CTR, PRIOR_N = 0.1, 20.0   # Beta prior of every smoothed rate: PRIOR_N pseudo-impressions at the prior
LIKE_PRIOR, NEGATIVE_PRIOR = 0.05, 0.01
COMMENT_PRIOR, SHARE_PRIOR, LONG_DWELL_PRIOR = 0.02, 0.015, 0.05
RECENCY_HOURS = 12.0             # recency = exp(-age / RECENCY_HOURS)

_LIGHT_LO = np.array([f.lo for f in LIGHT_FEATURES], dtype=np.float32)
_LIGHT_HI = np.array([f.hi for f in LIGHT_FEATURES], dtype=np.float32)


def rate(k: np.ndarray, n: np.ndarray, prior: float = PRIOR_CTR) -> np.ndarray:
    """Smoothed rate k / n under the Beta prior (PRIOR_N pseudo-impressions at ``prior``)."""
    return (k + PRIOR_N * prior) / (n + PRIOR_N)


def light(*, age_h: np.ndarray, affinity: np.ndarray, follows: np.ndarray, in_network: np.ndarray, ann: np.ndarray,
          topic_click_share: np.ndarray, topic_negative_share: np.ndarray, ctype_click_share: np.ndarray,
          impressions: np.ndarray, clicks: np.ndarray, likes: np.ndarray, negatives: np.ndarray,
          clicks_1h: np.ndarray, topic_trend: np.ndarray, author_followers: np.ndarray, author_ctr: np.ndarray,
          original: np.ndarray, flagged: np.ndarray, user_clicks: np.ndarray | float) -> np.ndarray:
    """[n, 20] float32 in LIGHT_FEATURES order. Per-user inputs may be scalars (one request's user)."""
    n = np.shape(age_h)[0]
    x = np.stack([
        np.exp(-age_h / RECENCY_HOURS), np.log1p(age_h), np.log1p(affinity), follows.astype(float),
        in_network.astype(float), ann,
        topic_click_share, topic_negative_share, ctype_click_share,
        rate(clicks, impressions), rate(likes, impressions, LIKE_PRIOR), rate(negatives, impressions, NEGATIVE_PRIOR),
        np.log1p(clicks_1h), np.log1p(impressions), topic_trend, np.log1p(author_followers), author_ctr,
        original.astype(float), flagged.astype(float), np.broadcast_to(np.log1p(user_clicks), (n,)),
    ], axis=1).astype(np.float32)
    return np.clip(x, _LIGHT_LO, _LIGHT_HI)


def heavy_extra(*, user_emb: np.ndarray, post_emb: np.ndarray, user_topic_clicks: np.ndarray, ctype: np.ndarray,
                user_negatives: np.ndarray | float, user_clicks: np.ndarray | float, impressions: np.ndarray,
                comments: np.ndarray, shares: np.ndarray, long_dwells: np.ndarray,
                hour: np.ndarray | float) -> np.ndarray:
    """[n, len(HEAVY_EXTRA)] float32: the heavy ranker's features after the light ones. ``user_emb`` and
    ``user_topic_clicks`` are [n, d] or one row for all."""
    n = np.shape(post_emb)[0]
    neg_total = np.asarray(user_negatives, dtype=np.float64) / np.maximum(
        np.asarray(user_negatives, dtype=np.float64) + user_clicks, 1)
    angle = 2 * np.pi * np.asarray(hour, dtype=np.float64) / 24
    out = np.hstack([
        np.broadcast_to(user_emb, (n, np.shape(user_emb)[-1])), post_emb,
        np.broadcast_to(user_topic_clicks, (n, np.shape(user_topic_clicks)[-1])),
        np.eye(N_CTYPES, dtype=np.float32)[np.minimum(ctype, N_CTYPES - 1)],
        np.stack([np.broadcast_to(neg_total, (n,)), rate(comments, impressions, COMMENT_PRIOR),
                  rate(shares, impressions, SHARE_PRIOR), rate(long_dwells, impressions, LONG_DWELL_PRIOR),
                  np.broadcast_to(np.sin(angle), (n,)), np.broadcast_to(np.cos(angle), (n,))], axis=1),
    ]).astype(np.float32)
    assert out.shape[1] == len(HEAVY_EXTRA), (out.shape, len(HEAVY_EXTRA))
    return out
