"""Generate a simulated social world and its logged feed history (vectorised, seeded).

Output directory::

    users.parquet  posts.parquet  follows.parquet  impressions.parquet  engagements.parquet
    ground_truth.npz  world.json

The Parquet tables carry ``event_timestamp`` columns so Feast's file offline store can
read them directly. The logged history comes from a *logging policy* that ranks a mix of
follow-graph and recent global candidates by a noisy view of the truth, so logs contain
both position bias and selection bias, as real logs do. Same seed, same tables.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.config import Config, Sim
from sim import truth
from core.events import CONTENT_TYPES
from core.units import DAY_MS, HOUR_MS
from sim.world import TOPIC_NAMES, TrendShift, UtilityWeights, World

CTYPES = np.array(CONTENT_TYPES)
SYLLABLES = ["ka", "lo", "mi", "ra", "ne", "tu", "vo", "sa", "pe", "di", "go", "fu", "ba", "ze", "ri", "no",
             "ya", "ho", "je", "wu", "ci", "mo", "te", "la"]


@dataclass(frozen=True)
class WorldSpec:
    users: int
    creators: int
    posts: int
    impressions: int
    sim: Sim

    @classmethod
    def from_config(cls, cfg: Config, scale: str | None = None, seed: int | None = None) -> "WorldSpec":
        sim = cfg.sim if seed is None else cfg.sim.model_copy(update={"seed": seed})
        name = scale or sim.scale
        if name not in sim.scales:
            raise ValueError(f"unknown scale {name!r}; choose one of {sorted(sim.scales)}")
        s = sim.scales[name]
        return cls(s.users, s.creators, s.posts, s.impressions, sim)


Progress = Callable[[str, float], None]


def _noop(stage: str, frac: float) -> None:
    pass


def vocabulary(n_topics: int, per_topic: int, rng: np.random.Generator) -> list[list[str]]:
    """Pseudo-words: topic vocabularies (index 0..T-1) plus one shared vocabulary (index T)."""
    seen: set[str] = set()
    vocab: list[list[str]] = []
    for _ in range(n_topics + 1):
        words: list[str] = []
        while len(words) < per_topic:
            w = "".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), size=int(rng.integers(2, 4))))
            if w not in seen:
                seen.add(w)
                words.append(w)
        vocab.append(words)
    return vocab


def _sample_rows(cum: np.ndarray, rows: np.ndarray, rng: np.random.Generator, chunk: int = 1_000_000) -> np.ndarray:
    """For each index r in rows, draw a category from the row cum[r] (cumulative probs)."""
    out = np.empty(rows.size, dtype=np.int64)
    for i in range(0, rows.size, chunk):
        r = rows[i: i + chunk]
        u = rng.random(r.size)[:, None]
        out[i: i + chunk] = (cum[r] < u).sum(axis=1)
    return np.minimum(out, cum.shape[1] - 1)


def generate_world(spec: WorldSpec, progress: Progress = _noop) -> tuple[World, dict[str, pa.Table]]:
    s = spec.sim
    rng = np.random.default_rng(s.seed)
    U, C, P, T = spec.users, spec.creators, spec.posts, s.topics
    start_ms = int(datetime.fromisoformat(s.start.replace("Z", "+00:00")).timestamp() * 1000)
    end_ms = start_ms + int(s.days * DAY_MS)
    warmup_ms = 3 * DAY_MS  # posts exist before the logged history starts

    # ---- users: sparse topic tastes, content-type tastes, heavy-tailed activity
    progress("users", 0.0)
    topic_pop = rng.dirichlet(np.full(T, 2.0))
    raw = rng.dirichlet(np.full(T, 0.25), size=U) * 0.7 + rng.dirichlet(topic_pop * T, size=U) * 0.3
    topic_pref = (raw / raw.max(axis=1, keepdims=True)).astype(np.float32)  # in [0, 1], 1 = favourite
    ctype_pref = rng.dirichlet(np.full(3, 1.0), size=U).astype(np.float32)
    activity = rng.lognormal(0.0, 1.0, size=U).astype(np.float32)

    # ---- creators: a subset of users with a main topic, quality and posting rate
    creator_ids = np.sort(rng.choice(U, size=C, replace=False))
    is_creator = np.zeros(U, dtype=bool)
    is_creator[creator_ids] = True
    creator_topic = np.full(U, -1, dtype=np.int16)
    creator_topic[creator_ids] = rng.choice(T, size=C, p=topic_pop)
    creator_quality = np.zeros(U, dtype=np.float32)
    creator_quality[creator_ids] = rng.normal(0.0, 0.5, size=C)
    rank = rng.permutation(C) + 1
    popularity = rank.astype(np.float64) ** -s.follow_zipf  # Zipf over creators
    popularity *= np.exp(creator_quality[creator_ids])       # better creators are a bit more popular
    popularity /= popularity.sum()
    post_rate = popularity ** 0.5 * rng.lognormal(0, 0.7, size=C)
    post_rate /= post_rate.sum()
    creator_ctype = rng.dirichlet(np.full(3, 0.7), size=C)

    # ---- follow graph: popularity-driven + topic-driven + celebrities
    progress("follows", 0.1)
    outdeg = np.clip(rng.lognormal(np.log(25.0), 0.9, size=U), 1, min(C - 1, 2000)).astype(np.int64)
    src_all = np.repeat(np.arange(U, dtype=np.int64), outdeg)
    by_topic = rng.random(src_all.size) < 0.75
    dst_all = np.empty(src_all.size, dtype=np.int64)
    n_pop = int((~by_topic).sum())
    dst_all[~by_topic] = creator_ids[rng.choice(C, size=n_pop, p=popularity)]
    tsrc = src_all[by_topic]
    cum_pref = np.cumsum(topic_pref / topic_pref.sum(axis=1, keepdims=True), axis=1)
    ttopic = _sample_rows(cum_pref, tsrc, rng)
    tdst = np.empty(tsrc.size, dtype=np.int64)
    ctopic = creator_topic[creator_ids]
    for t in range(T):
        m = ttopic == t
        pool = np.flatnonzero(ctopic == t)
        if pool.size == 0:
            pool = np.arange(C)
        w = popularity[pool] ** 0.5
        w /= w.sum()
        tdst[m] = creator_ids[pool[rng.choice(pool.size, size=int(m.sum()), p=w)]]
    dst_all[by_topic] = tdst
    celebs = creator_ids[np.argsort(-popularity)[: s.celebrities]]
    cs, cd = [src_all], [dst_all]
    for c in celebs:
        reach = rng.uniform(*s.celebrity_reach)
        fans = rng.choice(U, size=int(reach * U) + 1, replace=False)
        cs.append(fans)
        cd.append(np.full(fans.size, c, dtype=np.int64))
    src_all, dst_all = np.concatenate(cs), np.concatenate(cd)
    keep = src_all != dst_all
    pair = np.unique(src_all[keep] * U + dst_all[keep])
    follow_src, follow_dst = pair // U, pair % U
    follow_ts = start_ms - warmup_ms - rng.integers(0, 180 * DAY_MS, size=pair.size)

    # ---- posts: authored by creators at their rate, over warm-up + history
    progress("posts", 0.2)
    cidx = rng.choice(C, size=P, p=post_rate)
    post_author = creator_ids[cidx]
    post_ts = np.sort(rng.integers(start_ms - warmup_ms, end_ms, size=P))
    own_topic = rng.random(P) < 0.8
    post_topic = np.where(own_topic, ctopic[cidx], rng.choice(T, size=P, p=topic_pop)).astype(np.int16)
    cum_ct = np.cumsum(creator_ctype, axis=1)
    post_ctype = _sample_rows(cum_ct, cidx, rng).astype(np.int8)
    post_quality = rng.normal(0.0, 0.5, size=P).astype(np.float32)
    post_flagged = rng.random(P) < s.policy_flag_rate
    is_repost = rng.random(P) < s.repost_rate
    is_repost[0] = False
    original_id = np.full(P, -1, dtype=np.int64)
    rp = np.flatnonzero(is_repost)
    original_id[rp] = np.floor(rng.random(rp.size) * rp).astype(np.int64)  # an earlier post
    post_topic[rp] = post_topic[original_id[rp]]
    post_ctype[rp] = post_ctype[original_id[rp]]
    post_quality[rp] = post_quality[original_id[rp]] - 0.3  # a repost adds less than the original

    # ---- text: words from the topic's vocabulary, some shared words
    progress("text", 0.3)
    vocab = vocabulary(T, s.vocab_per_topic, rng)
    flat = np.array([w for ws in vocab for w in ws])
    lo, hi = s.words_per_post
    n_words = rng.integers(lo, hi + 1, size=P)
    maxw = hi
    from_topic = rng.random((P, maxw)) < 0.7
    widx = rng.integers(0, s.vocab_per_topic, size=(P, maxw))
    vocab_row = np.where(from_topic, post_topic[:, None].astype(np.int64), T)
    words = flat[vocab_row * s.vocab_per_topic + widx]
    text = [" ".join(words[i, : n_words[i]]) for i in range(P)]

    trends = [TrendShift(ts.topic, start_ms + int(ts.at_day * DAY_MS), ts.boost) for ts in s.trend_shifts]
    world = World(
        seed=s.seed, start_ms=start_ms, end_ms=end_ms, eta=s.examination_eta,
        n_users=int(topic_pref.shape[0]), n_topics=int(topic_pref.shape[1]), topic_pref=topic_pref, ctype_pref=ctype_pref, activity=activity, is_creator=is_creator,
        creator_quality=creator_quality, creator_topic=creator_topic,
        post_author=post_author.astype(np.int64), post_topic=post_topic, post_ctype=post_ctype,
        post_quality=post_quality, post_flagged=post_flagged, post_original=~is_repost,
        post_ts=post_ts.astype(np.int64), follow_src=follow_src, follow_dst=follow_dst,
        trends=trends, weights=UtilityWeights(), vocab=np.array(vocab),
    )

    # ---- logged history
    imps, engs = simulate_history(world, spec, rng, progress)

    progress("tables", 0.9)
    fcount = world.follower_counts()
    following = np.bincount(world.follow_src, minlength=U)
    ts_col = lambda ms: pa.array(ms.astype("datetime64[ms]"), type=pa.timestamp("ms", tz="UTC"))  # noqa: E731
    signup = start_ms - warmup_ms - rng.integers(0, 365 * DAY_MS, size=U)
    tables = {
        "users": pa.table({
            "user_id": np.arange(U, dtype=np.int64), "is_creator": is_creator,
            "follower_count": fcount.astype(np.int64), "following_count": following.astype(np.int64),
            "signup_ts": signup, "event_timestamp": ts_col(signup),
        }),
        "posts": pa.table({
            "post_id": np.arange(P, dtype=np.int64), "author_id": post_author.astype(np.int64),
            "topic": post_topic.astype(np.int32), "content_type": CTYPES[post_ctype],
            "is_original": ~is_repost, "original_post_id": pa.array(original_id, mask=original_id < 0),
            "policy_flagged": post_flagged, "text": text, "ts": post_ts, "event_timestamp": ts_col(post_ts),
        }),
        "follows": pa.table({
            "user_id": follow_src, "author_id": follow_dst, "ts": follow_ts, "event_timestamp": ts_col(follow_ts),
        }),
        "impressions": imps,
        "engagements": engs,
    }
    progress("done", 1.0)
    return world, tables


def simulate_history(world: World, spec: WorldSpec, rng: np.random.Generator, progress: Progress = _noop) -> tuple[pa.Table, pa.Table]:
    """Feed sessions served by a noisy logging policy, and what users did with them."""
    s = spec.sim
    U, L, K = world.n_users, s.session_length, s.candidates_per_session
    S = spec.impressions // L
    p_act = world.activity / world.activity.sum()
    sess_user = rng.choice(U, size=S, p=p_act)
    sess_ts = np.sort(rng.integers(world.start_ms, world.end_ms, size=S))
    # posts by (author, ts) for "recent posts of a followed author"
    by_author = np.lexsort((world.post_ts, world.post_author))
    a_sorted, t_sorted = world.post_author[by_author], world.post_ts[by_author]
    a_start = np.searchsorted(a_sorted, np.arange(U + 1))
    span = np.int64(world.end_ms + 1)
    a_key = a_sorted.astype(np.int64) * span + t_sorted
    deg = np.diff(world._follow_offsets)
    fc = world.follower_counts()
    pop_feature = np.log1p(fc) / np.log1p(max(int(fc.max()), 1))
    imp_cols: dict[str, list[np.ndarray]] = {k: [] for k in ("sess", "user", "post", "pos", "ts", "z", "innet")}
    chunk = max(1, 2_000_000 // K)
    for c0 in range(0, S, chunk):
        progress("history", 0.35 + 0.5 * c0 / S)
        su, st = sess_user[c0: c0 + chunk], sess_ts[c0: c0 + chunk]
        n = su.size
        cand = np.full((n, K), -1, dtype=np.int64)
        half = K // 2
        # follow-graph candidates: a random followed author's recent posts
        has = deg[su] > 0
        r = rng.random((n, half))
        fa = world.follow_dst[np.minimum(world._follow_offsets[su][:, None] + (r * deg[su][:, None]).astype(np.int64),
                                         world.follow_dst.size - 1)]
        before = np.searchsorted(a_key, fa * span + st[:, None]) - a_start[fa]
        pick = before - 1 - (rng.random((n, half)) * np.minimum(before, 10)).astype(np.int64)
        ok = has[:, None] & (before > 0)
        cand[:, :half] = np.where(ok, by_author[np.clip(a_start[fa] + pick, 0, by_author.size - 1)], -1)
        # global recent candidates (last 48 h); also fill failed follow slots
        hi = np.searchsorted(world.post_ts, st)
        lo = np.searchsorted(world.post_ts, st - 2 * DAY_MS)
        gl = lo[:, None] + (rng.random((n, K)) * np.maximum(hi - lo, 1)[:, None]).astype(np.int64)
        gl = np.clip(gl, 0, world.n_posts - 1)
        cand = np.where(cand < 0, gl, cand)
        # de-duplicate within a session
        srt = np.sort(cand, axis=1)
        dup_sorted = np.zeros_like(srt, dtype=bool)
        dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
        order = np.argsort(cand, axis=1, kind="stable")
        dup = np.empty_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        z = world.logit(su[:, None], cand, st[:, None])
        innet = world.follows(su[:, None], world.post_author[cand])
        # the logging policy: the previous production ranker, from observable signals only
        age_h = np.maximum(st[:, None] - world.post_ts[cand], 0) / HOUR_MS
        score = (truth.LOG_RECENCY * np.exp(-age_h / 12.0) + truth.LOG_IN_NETWORK * innet
                 + truth.LOG_POPULARITY * pop_feature[world.post_author[cand]] + truth.LOG_CTYPE[world.post_ctype[cand]]
                 + rng.normal(0.0, truth.LOG_NOISE, size=z.shape))
        score[dup] = -np.inf
        top = np.argsort(-score, axis=1, kind="stable")[:, :L]
        rows = np.arange(n)[:, None]
        imp_cols["sess"].append(np.repeat(np.arange(c0, c0 + n), L))
        imp_cols["user"].append(np.repeat(su, L))
        imp_cols["post"].append(cand[rows, top].ravel())
        imp_cols["pos"].append(np.tile(np.arange(1, L + 1), n))
        imp_cols["ts"].append((st[:, None] + np.arange(L)[None, :] * truth.SESSION_STEP_MS).ravel())
        imp_cols["z"].append(z[rows, top].ravel())
        imp_cols["innet"].append(innet[rows, top].ravel())
    col = {k: np.concatenate(v) for k, v in imp_cols.items()}
    N = col["post"].size

    # ---- behaviour: examination, click, actions, dwell, negative feedback
    progress("behaviour", 0.85)
    z, post = col["z"], col["post"]
    ctype, flagged = world.post_ctype[post], world.post_flagged[post].astype(np.float64)
    examined = rng.random(N) < world.examination_prob(col["pos"])
    b = truth.sample_behaviour(z, ctype, flagged, examined, rng)
    click, like, comment, share = b["click"], b["like"], b["comment"], b["share"]
    dwell, neg, neg_kind = b["dwell_ms"], b["negative"], b["negative_kind"]

    req = np.char.add(f"h{world.seed}-", col["sess"].astype(str))
    author = world.post_author[post]
    ts = col["ts"]
    tsa = lambda ms: pa.array(ms.astype("datetime64[ms]"), type=pa.timestamp("ms", tz="UTC"))  # noqa: E731
    impressions = pa.table({
        "request_id": req, "user_id": col["user"], "post_id": post, "author_id": author,
        "position": col["pos"].astype(np.int32), "feed_type": np.full(N, "home"),
        "source": np.where(col["innet"], "in_network", "out_of_network"), "model_version": np.full(N, "logging-v0"),
        "ts": ts, "event_timestamp": tsa(ts),
    })
    parts = []
    for name, mask, delay in (("click", click, 800), ("like", like, 4000), ("comment", comment, 9000),
                              ("share", share, 6000), ("dwell", click, 0), ("neg", neg, 2500)):
        idx = np.flatnonzero(mask)
        action = neg_kind[idx] if name == "neg" else np.full(idx.size, name)
        e_ts = ts[idx] + (dwell[idx] if name == "dwell" else delay)
        parts.append((idx, action, e_ts, np.where(name == "dwell", dwell[idx], -1)))
    idx = np.concatenate([p[0] for p in parts])
    action = np.concatenate([p[1] for p in parts])
    e_ts = np.concatenate([p[2] for p in parts])
    dw = np.concatenate([p[3] for p in parts])
    order = np.lexsort((action, e_ts))
    idx, action, e_ts, dw = idx[order], action[order], e_ts[order], dw[order]
    event_id = np.char.add(np.char.add(req[idx], "-"), np.char.add(col["pos"][idx].astype(str), np.char.add("-", action)))
    engagements = pa.table({
        "event_id": event_id, "user_id": col["user"][idx], "post_id": post[idx], "author_id": author[idx],
        "action": action, "dwell_ms": pa.array(dw, mask=dw < 0), "position": col["pos"][idx].astype(np.int32),
        "request_id": req[idx], "ts": e_ts, "event_timestamp": tsa(e_ts),
    })
    return impressions, engagements


def write_world(world: World, tables: dict[str, pa.Table], out: Path, spec: WorldSpec, scale: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, tbl in tables.items():
        pq.write_table(tbl, out / f"{name}.parquet", compression="zstd")
    world.save(out / "ground_truth.npz")
    world.save_corpus(out)  # what training and batch features read (no latent truth)
    meta = {
        "scale": scale, "seed": spec.sim.seed, "users": spec.users, "creators": spec.creators,
        "posts": spec.posts, "impressions": tables["impressions"].num_rows,
        "engagements": tables["engagements"].num_rows, "follows": tables["follows"].num_rows,
        "start_ms": world.start_ms, "end_ms": world.end_ms, "topics": TOPIC_NAMES[: world.n_topics]
        if world.n_topics <= len(TOPIC_NAMES) else [f"topic{t}" for t in range(world.n_topics)],
        "trend_shifts": [{"topic": t.topic, "at_ms": t.at_ms, "boost": t.boost} for t in world.trends],
        "examination_eta": world.eta,
    }
    (out / "world.json").write_text(json.dumps(meta, indent=2))


def generate(cfg: Config, scale: str, seed: int | None, out: Path, progress: Progress = _noop) -> dict:
    """Generate and write a world; returns its summary with the elapsed seconds."""
    t0 = time.perf_counter()
    spec = WorldSpec.from_config(cfg, scale, seed)
    world, tables = generate_world(spec, progress)
    write_world(world, tables, out, spec, scale)
    meta = json.loads((out / "world.json").read_text())
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    return meta
