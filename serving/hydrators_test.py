"""Online/offline parity of the ranking vectors: the serving hydrators, given the online values of a
point in time (post statistics, user rows, author CTRs, topic trends as the feature job publishes
them), produce exactly the rows training computes from the logged history at that time."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pandas as pd

from core.config import load_config
from core.events import is_positive
from core.schema import EMB_DIM, HEAVY_FEATURES, HEAVY_NAMES, LIGHT_NAMES, N_CTYPES, N_TOPICS, POST_STATS_INT
from core.corpus import Corpus
from core.units import HOUR_MS
from features.change_streams import PostStatsCache
from features import realtime as rt
from features.offline import LONG_DWELL_MS, History
from features.vectors import rate
from serving.catalog import FollowGraph, PostCatalog
from serving.components import IN_NETWORK, OUT_OF_NETWORK, Candidates, Query, UserContext
from serving.hydrators import HeavyFeatureHydrator, LightFeatureHydrator

DIM = EMB_DIM
T0 = 1_700_000_000_000
CHECKED = (3, 17, 29)


def _history(rng: np.random.Generator) -> History:
    users, posts = 40, 300
    corpus = Corpus(start_ms=T0, end_ms=T0 + 48 * HOUR_MS, n_users=users, n_topics=N_TOPICS,
                    post_author=rng.integers(0, users, posts), post_topic=rng.integers(0, N_TOPICS, posts),
                    post_ctype=rng.integers(0, N_CTYPES, posts), post_flagged=rng.random(posts) < 0.1,
                    post_original=rng.random(posts) < 0.8, post_ts=np.sort(T0 + rng.integers(0, 40 * HOUR_MS, posts)),
                    follow_src=rng.integers(0, users, 300), follow_dst=rng.integers(0, users, 300))
    n_imp, n_eng = 6000, 2500
    imp = pd.DataFrame({"user_id": rng.integers(0, users, n_imp), "post_id": rng.integers(0, posts, n_imp),
                        "ts": T0 + rng.integers(0, 48 * HOUR_MS, n_imp)})
    # the checked users are mid-session at the end: a run of views 1.5 s apart in its last 20 minutes
    session = [pd.DataFrame({"user_id": u, "post_id": rng.integers(0, posts, 15),
                             "ts": T0 + 48 * HOUR_MS - 20 * 60_000 + np.arange(15) * 1500}) for u in CHECKED]
    imp = pd.concat([imp, *session], ignore_index=True)
    actions = np.array(["click", "like", "comment", "share", "dwell", "hide", "not_interested", "see_less"])
    act = actions[rng.choice(len(actions), n_eng, p=[0.4, 0.15, 0.05, 0.05, 0.2, 0.05, 0.05, 0.05])]
    eng = pd.DataFrame({"user_id": rng.integers(0, users, n_eng), "post_id": rng.integers(0, posts, n_eng),
                        "action": act, "dwell_ms": np.where(act == "dwell", rng.integers(1_000, 60_000, n_eng), 0),
                        "ts": T0 + rng.integers(0, 48 * HOUR_MS, n_eng)})
    # the last hour is busy, so velocities, trends and 1-hour windows are not all zero
    eng.loc[: 400, "ts"] = T0 + 47 * HOUR_MS + rng.integers(0, HOUR_MS, 401)
    return History(corpus, imp, eng)


def _online(h: History, user: int, t: int, user_emb: np.ndarray, post_emb: np.ndarray) -> tuple[SimpleNamespace, UserContext]:
    """What serving holds at ``t``: the values the streaming feature job computes, from the same events."""
    w = h.world
    posts = np.arange(w.n_posts)
    cat = PostCatalog(capacity=w.n_posts, dim=DIM)
    cat.load(posts, w.post_author, w.post_topic, w.post_ctype, w.post_original, w.post_flagged, w.post_ts)
    cat.set_embeddings(posts, post_emb)
    graph = FollowGraph()
    graph.load(w.follow_src, w.follow_dst)
    stats = PostStatsCache(load_config({}), capacity=w.n_posts)
    tt = np.full(posts.size, t)
    counts = {"impressions": "impressions", "clicks": "clicks", "likes": "likes", "comments": "comments",
              "shares": "shares", "negatives": "negative", "long_dwells": "long_dwell"}
    for j, name in enumerate(POST_STATS_INT):
        if name in counts:
            stats.ints[:, j] = h.post[counts[name]].before(posts, tt)
        else:
            minutes = 5 if name == "clicks_5m" else 60
            stats.ints[:, j] = h.post["clicks"].between(posts, tt - minutes * 60_000, tt)
    authors = np.arange(w.n_users)
    ta = np.full(authors.size, t)
    author_ctr = rate(h.author["clicks"].before(authors, ta), h.author["impressions"].before(authors, ta))
    topics = np.arange(N_TOPICS)
    tk = np.full(topics.size, t)
    trend = np.log(rate(h.topic_clicks.between(topics, tk - HOUR_MS, tk), h.topic_impr.between(topics, tk - HOUR_MS, tk))
                   / rate(h.topic_clicks.before(topics, tk), h.topic_impr.before(topics, tk)))
    # the user's rows as the feature job computes them: its user_update over the user's events in time order
    # (views are the served impressions, as History reads them), and serving's affinity (positive engagements)
    s = rt.new_user_state()
    events = [(ts, rt.A["view"], p, 0) for p, ts in zip(h.views.values[h.views.groups == user], h.views.ts[h.views.groups == user])]
    mine = (h.e_user == user) & (h.e_ts < t)
    events += [(ts, rt.A[a], p, d) for ts, a, p, d in zip(h.e_ts[mine], h.e_act[mine], h.e_post[mine], h.e_dwell[mine])]
    affinity: dict[int, int] = {}
    for i, (ts, a, p, d) in enumerate(sorted(e for e in events if e[0] < t)):
        rt.user_update(s, (rt.ENGAGEMENT, str(i), int(ts), user, int(p), int(w.post_author[p]), a, int(d),
                           int(w.post_topic[p]), int(w.post_ctype[p]), "", 1), LONG_DWELL_MS)
        if is_positive(rt.ACTIONS[a], int(d), LONG_DWELL_MS):
            affinity[int(w.post_author[p])] = affinity.get(int(w.post_author[p]), 0) + 1
    row, sess = rt.user_row(s), rt.session_rows([s])
    u = UserContext(user_id=user, following=np.sort(graph.following(user)).astype(np.int64),
                    topic_clicks=np.asarray(row["topic_clicks"], np.float32),
                    topic_negative=np.asarray(row["topic_negative"], np.float32),
                    ctype_clicks=np.asarray(row["ctype_clicks"], np.float32), clicks=row["clicks"],
                    negatives=row["negatives"], embedding=user_emb, affinity=affinity,
                    viewed_posts=np.array(sess["viewed_posts"][0], dtype=np.int64),
                    liked_posts=np.array(sess["liked_posts"][0], dtype=np.int64),
                    session_start_ms=int(sess["session_start_ms"][0]), last_view_ms=int(sess["last_view_ms"][0]),
                    session_depth=int(sess["session_depth"][0]))
    ctx = SimpleNamespace(catalog=cat, graph=graph, stats=stats, author_ctr=author_ctr.astype(np.float32),
                          topic_trend=trend.astype(np.float32))
    return ctx, u


def test_serving_hydrators_and_training_compute_the_same_vectors_for_the_same_rows():
    rng = np.random.default_rng(5)
    h = _history(rng)
    w = h.world
    t = T0 + 48 * HOUR_MS
    post_emb = rng.normal(size=(w.n_posts, DIM)).astype(np.float32)
    post_emb /= np.linalg.norm(post_emb, axis=1, keepdims=True)
    post_emb = post_emb.astype(np.float16).astype(np.float32)  # the precision the index ships them at (post_emb.npy)
    checked = 0
    session_cols = [j for j, f in enumerate(HEAVY_FEATURES) if f.group == "session"]
    for user in CHECKED:
        user_emb = rng.normal(size=DIM).astype(np.float32)
        user_emb /= np.linalg.norm(user_emb)
        ctx, u = _online(h, user, t, user_emb, post_emb)
        posts = np.flatnonzero(w.post_ts < t)
        followed = w.follows(np.full(posts.size, user), w.post_author[posts])
        cands = Candidates(posts, np.where(followed, IN_NETWORK, OUT_OF_NETWORK), ann=np.zeros(posts.size, np.float32))
        q = Query(request_id="parity", user_id=user, feed_type="home", now_ms=t, limit=20, params=None,
                  experiments={}, deadline=time.monotonic() + 5, user=u)
        LightFeatureHydrator().hydrate(q, ctx, cands)
        HeavyFeatureHydrator().hydrate(q, ctx, cands)
        users = np.full(posts.size, user)
        offline = h.heavy_features(users, posts, np.full(posts.size, t), np.broadcast_to(user_emb, (posts.size, DIM)),
                                   post_emb[posts], in_network=followed)
        assert cands["x"].shape == offline.shape == (posts.size, len(HEAVY_NAMES))
        for j, name in enumerate(HEAVY_NAMES):
            np.testing.assert_allclose(cands["x"][:, j], offline[:, j], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(cands["x_light"], cands["x"][:, :len(LIGHT_NAMES)])
        # the rows are not degenerate: most features vary, so a formula that drifts on one side shows
        varying = [n for j, n in enumerate(LIGHT_NAMES) if np.ptp(offline[:, j]) > 0]
        assert len(varying) >= 15, varying
        assert (offline[:, session_cols] > 0).any(0).all(), "every session feature is non-zero for some post"
        checked += posts.size
    assert checked > 500
