"""A data directory (:mod:`core.corpus`) written from the served-data lake, so what trains on a corpus —
the two-tower today — trains on what serving logged with no simulator involved.

    corpus.npz           posts (every post the lake knows, published up to the window's end), the follow
                         graph as of the window's end (follows and unfollows replayed in time order)
    impressions.parquet  the window's exposures (what was served, at its position)
    engagements.parquet  the window's engagements (views left out: they mark the viewport, not interest)
    posts.parquet        post text, by post id

Post and user ids are dense from 0 (as serving's catalog and index assume); a post id the lake has no
``posts`` row for gets a placeholder row (flagged, so never a candidate) and is counted in ``unknown_posts``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config
from core.corpus import Corpus
from core.events import CONTENT_TYPES
from core.schema import N_TOPICS
from features import lake


def export_corpus(cfg: Config, dates: list[str], out: Path) -> dict[str, Any]:
    """Write the data directory of ``dates`` into ``out``; returns its counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    exp = lake.read_table(cfg, "exposures", dates)
    if exp.num_rows == 0:
        raise ValueError(f"no exposures in the lake for {', '.join(dates)} ({cfg.lake.uri})")
    eng = lake.read_table(cfg, "engagements", lake.days(_next(dates[-1]), len(dates) + 1))
    eng = eng.filter(pa.compute.not_equal(eng.column("action"), "view"))
    posts = lake.read_table(cfg, "posts")
    follows = lake.read_table(cfg, "follows")
    start = int(np.min(exp.column("ts").to_numpy()))
    end = int(max(np.max(exp.column("ts").to_numpy()), start + 1))
    posts = posts.filter(pa.compute.less_equal(posts.column("ts"), end))
    eng = eng.filter(pa.compute.less_equal(eng.column("ts"), end + int(cfg.lake.attribution_window_s * 1000)))

    pid = posts.column("post_id").to_numpy()
    ids = [pid, exp.column("post_id").to_numpy(), eng.column("post_id").to_numpy()]
    n_posts = int(max(int(a.max()) for a in ids if a.size)) + 1
    author = np.zeros(n_posts, dtype=np.int64)
    topic = np.zeros(n_posts, dtype=np.int64)
    ctype = np.zeros(n_posts, dtype=np.int64)
    original = np.ones(n_posts, dtype=bool)
    flagged = np.ones(n_posts, dtype=bool)  # placeholders stay flagged: never candidates
    ts = np.full(n_posts, start, dtype=np.int64)
    text = [""] * n_posts
    known = np.zeros(n_posts, dtype=bool)
    ct = {c: i for i, c in enumerate(CONTENT_TYPES)}
    for r in posts.to_pylist():
        p = r["post_id"]
        author[p], topic[p], ctype[p] = r["author_id"], r["topic"], ct.get(r["content_type"], 0)
        original[p], flagged[p], ts[p], text[p] = bool(r["is_original"]), bool(r["policy_flagged"]), r["ts"], r["text"] or ""
        known[p] = True
    unknown = np.flatnonzero(~known)
    if unknown.size:  # authors from what was served, where the lake saw them
        ea = dict(zip(exp.column("post_id").to_pylist(), exp.column("author_id").to_pylist()))
        for p in unknown:
            author[p] = ea.get(int(p)) or 0

    edges: dict[tuple[int, int], bool] = {}
    f = follows.sort_by([("ts", "ascending"), ("event_id", "ascending")])
    for u, a, on, t in zip(f.column("user_id").to_pylist(), f.column("author_id").to_pylist(),
                           f.column("followed").to_pylist(), f.column("ts").to_pylist()):
        if t <= end:
            edges[(u, a)] = bool(on)
    live = np.array([k for k, on in edges.items() if on], dtype=np.int64).reshape(-1, 2)
    users = [exp.column("user_id").to_numpy(), eng.column("user_id").to_numpy(), live.ravel(), author]
    n_users = int(max(int(a.max()) for a in users if a.size)) + 1
    Corpus(start_ms=start, end_ms=end, n_users=n_users, n_topics=N_TOPICS, post_author=author, post_topic=topic,
           post_ctype=ctype, post_flagged=flagged, post_original=original, post_ts=ts,
           follow_src=live[:, 0].copy(), follow_dst=live[:, 1].copy()).save_corpus(out)
    keep = ["request_id", "user_id", "post_id", "author_id", "position", "feed_type", "source", "model_version", "ts"]
    pq.write_table(exp.select(keep), out / "impressions.parquet")
    pq.write_table(eng.select(["event_id", "user_id", "post_id", "author_id", "action", "dwell_ms", "position",
                               "request_id", "ts"]), out / "engagements.parquet")
    pq.write_table(pa.table({"post_id": np.arange(n_posts), "text": text}), out / "posts.parquet")
    counts = {"dir": str(out), "dates": dates, "start_ms": start, "end_ms": end, "posts": n_posts, "unknown_posts": int(unknown.size),
              "users": n_users, "follows": int(live.shape[0]), "impressions": exp.num_rows, "engagements": eng.num_rows}
    (out / "_lake.json").write_text(json.dumps(counts))
    return counts


def _next(date: str) -> str:
    import datetime as dt

    return (dt.date.fromisoformat(date) + dt.timedelta(days=1)).isoformat()
