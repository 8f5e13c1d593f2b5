"""Feature hydrators: ranking vectors in :mod:`core.schema` order, from memory only.

The formulas are :mod:`features.vectors`, the ones training uses; the inputs are the
streaming feature job's online values. Post statistics come from the
in-process :class:`~features.change_streams.PostStatsCache`, post attributes and embeddings
from the :class:`~serving.catalog.PostCatalog`; the one user's Feast rows were read
with the request.
"""

from __future__ import annotations

import numpy as np

from core.schema import POST_STAT, POST_STATS_INT
from core.units import HOUR_MS
from features import vectors
from features.vectors import PRIOR_CTR
from serving.catalog import PostCatalog
from serving.components import IN_NETWORK, Candidates, FeatureHydrator, FunnelContext, Query, UserContext, member


def _stats(ctx: FunnelContext, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The posts' statistics from the in-process cache (zeros for posts it has not seen), by column name."""
    st = ctx.stats
    with st.lock:
        ok = ids < st.ints.shape[0]
        out = np.zeros((ids.size, st.ints.shape[1]), dtype=np.float64)
        out[ok] = st.ints[ids[ok]]
    return {name: out[:, POST_STAT[name]] for name in POST_STATS_INT}


class SkippedHydrator(FeatureHydrator):
    """A hydrator's stand-in when the request has no time left for it: no features (the scorers that
    need them fall back in turn)."""

    def __init__(self, of: str):
        self.of = of

    @property
    def name(self) -> str:
        return f"skip:{self.of}"

    def hydrate(self, query: Query, ctx: FunnelContext, cands: Candidates) -> None:
        return None


class LightFeatureHydrator(FeatureHydrator):
    """The light ranker's ~20 cheap features for every candidate (10K rows)."""

    deadline_fallback = SkippedHydrator("LightFeatureHydrator")

    reads = ("ann",)   # and "has_ann" where the ANN source wrote it
    writes = ("x_light", "ann")

    def hydrate(self, query: Query, ctx: FunnelContext, cands: Candidates) -> None:
        u, cat = query.user, ctx.catalog
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
        follows = member(u.following, author)
        if u.embedding is None:
            ann = np.zeros(ids.size, dtype=np.float32)
        elif "has_ann" in cands:  # ANN candidates carry the cosine already; compute the rest
            ann = cands["ann"].astype(np.float32, copy=True)
            todo = np.flatnonzero(~cands["has_ann"])
            ann[todo] = cat.embeddings(ids[todo]) @ u.embedding
        else:
            ann = cat.embeddings(ids) @ u.embedding
        s = _stats(ctx, ids)
        ctr_a = ctx.author_ctr
        a_ok = (author >= 0) & (author < ctr_a.size)
        author_ctr = np.full(ids.size, PRIOR_CTR, dtype=np.float64)
        author_ctr[a_ok] = ctr_a[author[a_ok]]
        trend = ctx.topic_trend
        t_ok = topic < trend.size
        cands["x_light"] = vectors.light(
            age_h=age_h, affinity=aff, follows=follows, in_network=cands.source == IN_NETWORK, ann=ann,
            topic_click_share=u.topic_clicks[topic], topic_negative_share=u.topic_negative[topic],
            ctype_click_share=u.ctype_clicks[np.minimum(ctype, u.ctype_clicks.size - 1)],
            impressions=s["impressions"], clicks=s["clicks"], likes=s["likes"], negatives=s["negatives"],
            clicks_1h=s["clicks_1h"], topic_trend=np.where(t_ok, trend[np.minimum(topic, trend.size - 1)], 0.0),
            author_followers=ctx.graph.follower_counts(author), author_ctr=author_ctr,
            original=cat.original[ids], flagged=cat.flagged[ids], user_clicks=u.clicks)
        cands["ann"] = ann.astype(np.float32)


def _session(now_ms: int, u: UserContext, cat: PostCatalog) -> vectors.Session:
    """The request's session inputs: the user_session row with its posts' topics and authors (posts the
    catalog does not know yet count as none)."""
    def known(p: np.ndarray) -> np.ndarray:
        return p[(p >= 0) & (p < cat.n)]

    viewed, liked = known(u.viewed_posts), known(u.liked_posts)
    return vectors.Session.of(now_ms, u.session_start_ms, u.last_view_ms, u.session_depth, cat.topic[viewed][None, :],
                              cat.topic[liked][None, :], cat.author[liked][None, :])


class HeavyFeatureHydrator(FeatureHydrator):
    """The heavy ranker's ~300 features (light ones first) for the light ranker's top 500."""

    reads = ("x_light",)
    writes = ("x",)
    deadline_fallback = SkippedHydrator("HeavyFeatureHydrator")

    def hydrate(self, query: Query, ctx: FunnelContext, cands: Candidates) -> None:
        u, cat = query.user, ctx.catalog
        ids = cands.ids
        s = _stats(ctx, ids)
        ue = u.embedding if u.embedding is not None else np.zeros(cat.emb.shape[1], dtype=np.float32)
        extra = vectors.heavy_extra(
            user_emb=ue, post_emb=cat.embeddings(ids), user_topic_clicks=u.topic_clicks, ctype=cat.ctype[ids],
            topic=cat.topic[ids], author=cat.author[ids], user_negatives=u.negatives, user_clicks=u.clicks,
            impressions=s["impressions"], comments=s["comments"], shares=s["shares"], long_dwells=s["long_dwells"],
            hour=(query.now_ms // HOUR_MS) % 24, session=_session(query.now_ms, u, cat))
        cands["x"] = np.hstack([cands["x_light"], extra])
