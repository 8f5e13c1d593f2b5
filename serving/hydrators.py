"""Feature hydrators: ranking vectors in :mod:`core.schema` order, from memory only.

The same definitions as :meth:`features.offline.History.light_features` /
``heavy_features`` (training) and the streaming feature job (online values): smoothed
rates with the same priors, the same log transforms. Post statistics come from the
in-process :class:`~features.client.PostStatsCache`, post attributes and embeddings
from the :class:`~serving.catalog.PostCatalog`; the one user's Feast rows were read
with the request.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from features.offline import PRIOR_CTR, PRIOR_N
from core.schema import LIGHT_FEATURES, N_CTYPES
from core.units import HOUR_MS
from serving.components import IN_NETWORK, Candidates, FeatureHydrator, Query

# PostStatsCache.ints columns (features.feast_repo.POST_STATS_INT order)
S_IMPR, S_CLK, S_LIKE, S_COMM, S_SHARE, S_NEG, S_LDWELL, S_C5M, S_C1H = range(9)


def _rate(k: np.ndarray, n: np.ndarray, prior: float = PRIOR_CTR) -> np.ndarray:
    return (k + PRIOR_N * prior) / (n + PRIOR_N)


def _member(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    if sorted_values.size == 0:
        return np.zeros(x.shape, dtype=bool)
    i = np.minimum(np.searchsorted(sorted_values, x), sorted_values.size - 1)
    return sorted_values[i] == x


def _stats(state: Any, ids: np.ndarray) -> np.ndarray:
    st = state.stats
    with st.lock:
        ok = ids < st.ints.shape[0]
        out = np.zeros((ids.size, st.ints.shape[1]), dtype=np.float64)
        out[ok] = st.ints[ids[ok]]
    return out


class LightFeatureHydrator(FeatureHydrator):
    """The light ranker's ~20 cheap features for every candidate (10K rows)."""

    writes = ("x_light", "ann")

    def hydrate(self, query: Query, state: Any, cands: Candidates) -> None:
        u, cat = query.user, state.catalog
        ids = cands.ids
        author, topic, ctype = cat.author[ids], cat.topic[ids], cat.ctype[ids]
        age_h = np.maximum(query.now_ms - cat.published_ms[ids], 0) / HOUR_MS
        if u.affinity:
            keys = np.fromiter(u.affinity.keys(), dtype=np.int64, count=len(u.affinity))
            vals = np.fromiter(u.affinity.values(), dtype=np.float64, count=len(u.affinity))
            o = np.argsort(keys)
            keys, vals = keys[o], vals[o]
            i = np.minimum(np.searchsorted(keys, author), keys.size - 1)
            aff = np.where(keys[i] == author, vals[i], 0.0)
        else:
            aff = np.zeros(ids.size)
        follows = _member(u.following, author)
        if u.embedding is None:
            ann = np.zeros(ids.size, dtype=np.float32)
        elif "has_ann" in cands:  # ANN candidates carry the cosine already; compute the rest
            ann = cands["ann"].astype(np.float32, copy=True)
            todo = np.flatnonzero(~cands["has_ann"])
            ann[todo] = cat.emb[ids[todo]] @ u.embedding
        else:
            ann = cat.emb[ids] @ u.embedding
        s = _stats(state, ids)
        ctr_a = state.author_ctr
        a_ok = (author >= 0) & (author < ctr_a.size)
        author_ctr = np.full(ids.size, PRIOR_CTR, dtype=np.float64)
        author_ctr[a_ok] = ctr_a[author[a_ok]]
        trend = state.topic_trend
        t_ok = topic < trend.size
        x = np.stack([
            np.exp(-age_h / 12.0), np.log1p(age_h), np.log1p(aff), follows.astype(float),
            (cands.source == IN_NETWORK).astype(float), ann,
            u.topic_clicks[topic], u.topic_negative[topic], u.ctype_clicks[np.minimum(ctype, N_CTYPES - 1)],
            _rate(s[:, S_CLK], s[:, S_IMPR]), _rate(s[:, S_LIKE], s[:, S_IMPR], 0.05),
            _rate(s[:, S_NEG], s[:, S_IMPR], 0.01), np.log1p(s[:, S_C1H]), np.log1p(s[:, S_IMPR]),
            np.where(t_ok, trend[np.minimum(topic, trend.size - 1)], 0.0),
            np.log1p(state.graph.follower_counts(author)), author_ctr,
            cat.original[ids].astype(float), cat.flagged[ids].astype(float),
            np.full(ids.size, np.log1p(u.clicks)),
        ], axis=1).astype(np.float32)
        lo = np.array([f.lo for f in LIGHT_FEATURES], dtype=np.float32)
        hi = np.array([f.hi for f in LIGHT_FEATURES], dtype=np.float32)
        cands["x_light"] = np.clip(x, lo, hi)
        cands["ann"] = ann.astype(np.float32)


class HeavyFeatureHydrator(FeatureHydrator):
    """The heavy ranker's ~300 features (light ones first) for the light ranker's top 500."""

    writes = ("x",)

    def hydrate(self, query: Query, state: Any, cands: Candidates) -> None:
        u, cat = query.user, state.catalog
        ids = cands.ids
        n = ids.size
        s = _stats(state, ids)
        ue = u.embedding if u.embedding is not None else np.zeros(cat.emb.shape[1], dtype=np.float32)
        hour = (query.now_ms // HOUR_MS) % 24
        neg_total = u.negatives / max(u.negatives + u.clicks, 1)
        extra = np.hstack([
            np.broadcast_to(ue, (n, ue.size)), cat.emb[ids], np.broadcast_to(u.topic_clicks, (n, u.topic_clicks.size)),
            np.eye(N_CTYPES, dtype=np.float32)[np.minimum(cat.ctype[ids], N_CTYPES - 1)],
            np.stack([np.full(n, neg_total), _rate(s[:, S_COMM], s[:, S_IMPR], 0.02),
                      _rate(s[:, S_SHARE], s[:, S_IMPR], 0.015), _rate(s[:, S_LDWELL], s[:, S_IMPR], 0.05),
                      np.full(n, np.sin(2 * np.pi * hour / 24)), np.full(n, np.cos(2 * np.pi * hour / 24))], axis=1),
        ]).astype(np.float32)
        cands["x"] = np.hstack([cands["x_light"], extra])
