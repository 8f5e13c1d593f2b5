"""Point-in-time features from logged history (training and offline evaluation).

Every count is "events of this key strictly before t", answered for millions of rows at
once with one sorted array and ``searchsorted`` — no feature ever sees the future of the
impression it describes. The streaming feature job computes the same counters online;
both turn them into vectors with the formulas of :mod:`features.vectors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from core.schema import N_CTYPES, N_TOPICS, SESSION_GAP_MS, SESSION_LIKED, SESSION_VIEWED
from core.units import HOUR_MS
from core.corpus import Corpus
from features import vectors
from features.vectors import rate

NEGATIVE = ("hide", "not_interested", "see_less")
POSITIVE = ("click", "like", "comment", "share")   # and a dwell of at least LONG_DWELL_MS (core.events.is_positive)
LONG_DWELL_MS = 30_000                              # heads.long_dwell_ms of the worlds trained on


class CountIndex:
    """Counts events per integer group before / between times, vectorised."""

    def __init__(self, groups: np.ndarray, ts: np.ndarray):
        groups = np.asarray(groups, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.int64)
        self.values = np.unique(groups)
        self.t0 = int(ts.min()) if ts.size else 0
        self.span = (int(ts.max()) - self.t0 + 2) if ts.size else 2
        dense = np.searchsorted(self.values, groups)
        self.keys = np.sort(dense * self.span + (ts - self.t0))

    def _dense(self, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        groups = np.asarray(groups, dtype=np.int64)
        if self.values.size == 0:
            return np.zeros(groups.shape, dtype=np.int64), np.zeros(groups.shape, dtype=bool)
        d = np.minimum(np.searchsorted(self.values, groups), self.values.size - 1)
        return d, self.values[d] == groups

    def before(self, groups: np.ndarray, t: np.ndarray) -> np.ndarray:
        d, ok = self._dense(groups)
        rel = np.clip(np.asarray(t, dtype=np.int64) - self.t0, 0, self.span - 1)
        n = np.searchsorted(self.keys, d * self.span + rel) - np.searchsorted(self.keys, d * self.span)
        return np.where(ok, n, 0)

    def between(self, groups: np.ndarray, t_from: np.ndarray, t_to: np.ndarray) -> np.ndarray:
        return self.before(groups, t_to) - self.before(groups, t_from)


class RecentIndex:
    """The last ``k`` events per integer group strictly before a time, vectorised (sorted by group, time)."""

    def __init__(self, groups: np.ndarray, ts: np.ndarray, values: np.ndarray, gap_ms: int | None = None):
        groups, ts = np.asarray(groups, dtype=np.int64), np.asarray(ts, dtype=np.int64)
        o = np.lexsort((ts, groups))
        self.groups, self.ts, self.values = groups[o], ts[o], np.asarray(values, dtype=np.int64)[o]
        self.t0 = int(ts.min()) if ts.size else 0
        self.span = (int(ts.max()) - self.t0 + 2) if ts.size else 2
        self.keys = self.groups * self.span + (self.ts - self.t0)
        # first row of each run of a group's events with no pause longer than gap_ms (a session)
        first = np.ones(self.groups.size, dtype=bool)
        if self.groups.size > 1:
            same = self.groups[1:] == self.groups[:-1]
            first[1:] = ~same if gap_ms is None else ~same | (np.diff(self.ts) > gap_ms)
        self.run_first = np.maximum.accumulate(np.where(first, np.arange(self.groups.size), 0))

    def last_row(self, groups: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Row of each group's last event before ``t`` (-1 if none)."""
        groups, t = np.asarray(groups, dtype=np.int64), np.asarray(t, dtype=np.int64)
        if self.keys.size == 0:
            return np.full(groups.shape, -1, dtype=np.int64)
        rel = np.clip(t - self.t0, 0, self.span - 1)
        i = np.searchsorted(self.keys, groups * self.span + rel) - 1
        ok = (i >= 0) & (self.groups[np.maximum(i, 0)] == groups) & (t > self.t0)
        return np.where(ok, i, -1)

    def last(self, rows: np.ndarray, k: int, same_run: bool = False) -> np.ndarray:
        """[n, k] values of the ``k`` events ending at ``rows`` (newest last; -1 = none), within the
        row's run when ``same_run``."""
        r = rows[:, None] - np.arange(k - 1, -1, -1)[None, :]
        if self.values.size == 0:
            return np.full(r.shape, -1, dtype=np.int64)
        top = np.maximum(rows, 0)
        ok = (rows[:, None] >= 0) & (r >= 0)
        rc = np.maximum(r, 0)
        ok &= self.groups[rc] == self.groups[top][:, None]
        if same_run:
            ok &= r >= self.run_first[top][:, None]
        return np.where(ok, self.values[rc], -1)


@dataclass
class UserState:
    """What the user tower and the rankers know about users at time t."""

    topic_clicks: np.ndarray   # [n, T] share of positive engagements (clicks, likes, comments, shares, long dwells)
    topic_neg: np.ndarray      # [n, T] share
    ctype_clicks: np.ndarray   # [n, 3] share of positive engagements
    neg_total: np.ndarray      # [n]
    log_activity: np.ndarray   # [n]
    clicks: np.ndarray         # [n] counts
    negatives: np.ndarray      # [n] counts

    @classmethod
    def from_counts(cls, tc: np.ndarray, tn: np.ndarray, cc: np.ndarray, clicks: np.ndarray) -> "UserState":
        """From per-user counts of positive engagements per topic [n, T], negative feedback per topic [n, T],
        positive engagements per content type [n, 3] and clicks [n]."""
        nc, nn = np.asarray(clicks, dtype=np.float32).reshape(-1), tn.sum(1)
        return cls(topic_clicks=(tc / np.maximum(tc.sum(1), 1)[:, None]).astype(np.float32),
                   topic_neg=(tn / np.maximum(nn, 1)[:, None]).astype(np.float32),
                   ctype_clicks=(cc / np.maximum(cc.sum(1), 1)[:, None]).astype(np.float32),
                   neg_total=(nn / np.maximum(nn + nc, 1)).astype(np.float32),
                   log_activity=np.log1p(nc).astype(np.float32), clicks=nc, negatives=nn)

    def dense(self) -> np.ndarray:
        """The user tower's dense input."""
        return np.hstack([self.topic_clicks, self.topic_neg, self.ctype_clicks,
                          self.neg_total[:, None], self.log_activity[:, None] / 8.0]).astype(np.float32)


USER_DENSE_DIM = 2 * N_TOPICS + N_CTYPES + 2


class History:
    """The logged world, indexed for point-in-time questions."""

    def __init__(self, world: Corpus, impressions, engagements):
        self.world = world
        T = world.n_topics
        eng = engagements
        act = eng["action"].to_numpy()
        e_user = eng["user_id"].to_numpy().astype(np.int64)
        e_post = eng["post_id"].to_numpy().astype(np.int64)
        e_ts = eng["ts"].to_numpy().astype(np.int64)
        dwell = eng["dwell_ms"].to_numpy(dtype=np.float64, na_value=0)
        click = act == "click"
        neg = np.isin(act, NEGATIVE)
        pos = np.isin(act, POSITIVE) | ((act == "dwell") & (dwell >= LONG_DWELL_MS))
        i_post = impressions["post_id"].to_numpy().astype(np.int64)
        i_ts = impressions["ts"].to_numpy().astype(np.int64)
        topic_e = world.post_topic[e_post].astype(np.int64)
        self.post = {
            "impressions": CountIndex(i_post, i_ts),
            "clicks": CountIndex(e_post[click], e_ts[click]),
            "likes": CountIndex(e_post[act == "like"], e_ts[act == "like"]),
            "comments": CountIndex(e_post[act == "comment"], e_ts[act == "comment"]),
            "shares": CountIndex(e_post[act == "share"], e_ts[act == "share"]),
            "long_dwell": CountIndex(e_post[(act == "dwell") & (dwell >= LONG_DWELL_MS)], e_ts[(act == "dwell") & (dwell >= LONG_DWELL_MS)]),
            "negative": CountIndex(e_post[neg], e_ts[neg]),
        }
        i_author = world.post_author[i_post]
        self.author = {"impressions": CountIndex(i_author, i_ts),
                       "clicks": CountIndex(world.post_author[e_post[click]], e_ts[click]),
                       "negative": CountIndex(world.post_author[e_post[neg]], e_ts[neg])}
        # likes, comments, shares and long dwells move preferences as clicks do (the feature job's user_update)
        self.user_topic_clicks = CountIndex(e_user[pos] * T + topic_e[pos], e_ts[pos])
        self.user_topic_neg = CountIndex(e_user[neg] * T + topic_e[neg], e_ts[neg])
        self.user_ctype = CountIndex(e_user[pos] * N_CTYPES + world.post_ctype[e_post[pos]], e_ts[pos])
        self.user_clicks = CountIndex(e_user[click], e_ts[click])
        self.user_neg = CountIndex(e_user[neg], e_ts[neg])
        pair = e_user[pos] * np.int64(world.n_users) + world.post_author[e_post[pos]]
        self.affinity_index = CountIndex(pair, e_ts[pos])   # serving counts each positive engagement too
        # the session: served impressions stand for views (a logged history holds what was scrolled to)
        i_user = impressions["user_id"].to_numpy().astype(np.int64)
        self.views = RecentIndex(i_user, i_ts, i_post, gap_ms=SESSION_GAP_MS)
        like = act == "like"
        self.likes = RecentIndex(e_user[like], e_ts[like], e_post[like])
        self.topic_clicks = CountIndex(topic_e[click], e_ts[click])
        self.topic_impr = CountIndex(world.post_topic[i_post].astype(np.int64), i_ts)
        self.e_user, self.e_post, self.e_ts, self.click = e_user, e_post, e_ts, click
        self.e_act, self.e_dwell = act, dwell.astype(np.int64)
        self.follower_counts = world.follower_counts()

    @classmethod
    def load(cls, data_dir: str | Path, world: Corpus | None = None) -> "History":
        d = Path(data_dir)
        world = world or Corpus.load_corpus(d)
        imp = pq.read_table(d / "impressions.parquet", columns=["user_id", "post_id", "ts"]).to_pandas()
        eng = pq.read_table(d / "engagements.parquet", columns=["user_id", "post_id", "action", "dwell_ms", "ts"]).to_pandas()
        return cls(world, imp, eng)

    # ------------------------------------------------------------------ users
    def user_state(self, users: np.ndarray, t: np.ndarray) -> UserState:
        users = np.asarray(users, dtype=np.int64)
        t = np.broadcast_to(np.asarray(t, dtype=np.int64), users.shape)
        T = self.world.n_topics
        tc = np.stack([self.user_topic_clicks.before(users * T + k, t) for k in range(T)], axis=1).astype(np.float32)
        tn = np.stack([self.user_topic_neg.before(users * T + k, t) for k in range(T)], axis=1).astype(np.float32)
        cc = np.stack([self.user_ctype.before(users * N_CTYPES + k, t) for k in range(N_CTYPES)], axis=1).astype(np.float32)
        return UserState.from_counts(tc, tn, cc, self.user_clicks.before(users, t))

    def session(self, users: np.ndarray, t: np.ndarray) -> vectors.Session:
        """The user_session view as of ``t`` (the feature job's user_update on the same events)."""
        users, t = np.asarray(users, dtype=np.int64), np.asarray(t, dtype=np.int64)
        v = self.views.last_row(users, t)
        vx = self.views
        if vx.ts.size:
            vr, has = np.maximum(v, 0), v >= 0
            start, last = np.where(has, vx.ts[vx.run_first[vr]], 0), np.where(has, vx.ts[vr], 0)
            depth = np.where(has, vr - vx.run_first[vr] + 1, 0)
        else:
            start = last = depth = np.zeros(users.shape, dtype=np.int64)
        viewed = self.views.last(v, SESSION_VIEWED, same_run=True)
        liked = self.likes.last(self.likes.last_row(users, t), SESSION_LIKED)
        w = self.world
        topic = lambda p: np.where(p >= 0, w.post_topic[np.maximum(p, 0)], -1)  # noqa: E731
        return vectors.Session.of(t, start, last, depth, topic(viewed), topic(liked),
                                  np.where(liked >= 0, w.post_author[np.maximum(liked, 0)], -1))

    # ------------------------------------------------------------------ features
    def light_features(self, users: np.ndarray, posts: np.ndarray, t: np.ndarray, ann: np.ndarray,
                       in_network: np.ndarray | None = None, state: UserState | None = None,
                       rows: np.ndarray | None = None) -> np.ndarray:
        """[n, 20] in LIGHT_FEATURES order. ``state`` may hold one row per user of ``rows``."""
        w = self.world
        users = np.asarray(users, dtype=np.int64)
        posts = np.asarray(posts, dtype=np.int64)
        t = np.broadcast_to(np.asarray(t, dtype=np.int64), posts.shape)
        if state is None:
            state, rows = self.user_state(users, t), np.arange(users.size)
        author = w.post_author[posts]
        topic = w.post_topic[posts].astype(np.int64)
        ctype = w.post_ctype[posts].astype(np.int64)
        age_h = np.maximum(t - w.post_ts[posts], 0) / HOUR_MS
        pc = {k: v.before(posts, t) for k, v in self.post.items()}
        follows = w.follows(users, author)
        aff = self.affinity_index.before(users * np.int64(w.n_users) + author, t)
        a_imp = self.author["impressions"].before(author, t)
        a_clk = self.author["clicks"].before(author, t)
        vel = self.post["clicks"].between(posts, t - HOUR_MS, t)
        t_recent = rate(self.topic_clicks.between(topic, t - HOUR_MS, t), self.topic_impr.between(topic, t - HOUR_MS, t))
        t_long = rate(self.topic_clicks.before(topic, t), self.topic_impr.before(topic, t))
        return vectors.light(
            age_h=age_h, affinity=aff, follows=follows, in_network=follows if in_network is None else in_network,
            ann=ann, topic_click_share=state.topic_clicks[rows, topic], topic_negative_share=state.topic_neg[rows, topic],
            ctype_click_share=state.ctype_clicks[rows, ctype], impressions=pc["impressions"], clicks=pc["clicks"],
            likes=pc["likes"], negatives=pc["negative"], clicks_1h=vel, topic_trend=np.log(t_recent / t_long),
            author_followers=self.follower_counts[author], author_ctr=rate(a_clk, a_imp),
            original=w.post_original[posts], flagged=w.post_flagged[posts], user_clicks=state.clicks[rows])

    def heavy_features(self, users: np.ndarray, posts: np.ndarray, t: np.ndarray, user_emb: np.ndarray,
                       post_emb: np.ndarray, in_network: np.ndarray | None = None,
                       request_t: np.ndarray | None = None) -> np.ndarray:
        """[n, ~340] in HEAVY_FEATURES order; embeddings are per row. The session features are as of
        ``request_t`` (when the row's request was served; default ``t``): serving computes them once per
        request, and as of the row's own time they would count the request's earlier positions."""
        users = np.asarray(users, dtype=np.int64)
        posts = np.asarray(posts, dtype=np.int64)
        t = np.broadcast_to(np.asarray(t, dtype=np.int64), posts.shape)
        state = self.user_state(users, t)
        rows = np.arange(users.size)
        ann = np.sum(user_emb * post_emb, axis=1)
        light = self.light_features(users, posts, t, ann, in_network, state, rows)
        pc = {k: self.post[k].before(posts, t) for k in ("impressions", "comments", "shares", "long_dwell")}
        w = self.world
        extra = vectors.heavy_extra(
            user_emb=user_emb, post_emb=post_emb, user_topic_clicks=state.topic_clicks,
            ctype=w.post_ctype[posts].astype(np.int64), topic=w.post_topic[posts].astype(np.int64),
            author=w.post_author[posts], user_negatives=state.negatives, user_clicks=state.clicks,
            impressions=pc["impressions"], comments=pc["comments"], shares=pc["shares"], long_dwells=pc["long_dwell"],
            hour=(t // HOUR_MS) % 24, session=self.session(users, t if request_t is None else request_t))
        return np.hstack([light, extra])


def labels(impressions, engagements, long_dwell_ms: int = LONG_DWELL_MS) -> np.ndarray:
    """[n, 6] head labels per impression (click, like, comment, share, long dwell, negative)."""
    key_i = impressions["request_id"].astype(str) + "#" + impressions["position"].astype(str)
    key_e = engagements["request_id"].astype(str) + "#" + engagements["position"].astype(str)
    act = engagements["action"].to_numpy()
    dwell = engagements["dwell_ms"].to_numpy(dtype=np.float64, na_value=0)
    out = np.zeros((len(impressions), 6), dtype=np.float32)
    for j, mask in enumerate([act == "click", act == "like", act == "comment", act == "share",
                              (act == "dwell") & (dwell >= long_dwell_ms), np.isin(act, NEGATIVE)]):
        out[:, j] = key_i.isin(set(key_e[mask])).to_numpy()
    return out

