"""Batch features from the lake (Apache Beam): ``feedrank batch run features --date D``.

    engagements (lake.interest_days ending D) ─ dedupe ─┐
    posts (every day up to D)                 ─ dedupe ─┴ CoGroupByKey(post) ─ engagements with author, topic, type
      ─ per user:   UserInterest     positive engagements over topics, content types and authors (shares)
      ─ per author: AuthorQuality    impressions (exposures), clicks, negatives, smoothed CTR and negative rate
    ─ Parquet: the Feast offline sources ``<data>/feast/user_interest.parquet`` and ``author_stats.parquet``
      (the ``user_interest`` and ``author_stats`` views), then materialised into the online store.

Positive engagements are the heads' positive actions (click, like, comment, share, long dwell). The CTR is
smoothed as serving and training smooth it (:func:`features.vectors.rate`); followers count the lake's
follows minus unfollows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from core.config import Config
from core.events import CONTENT_TYPES
from core.schema import N_TOPICS, NEGATIVE_ACTION_NAMES

TOP_AUTHORS = 10
POSITIVE = frozenset({"click", "like", "comment", "share"})


def is_positive(e: dict, long_dwell_ms: int) -> bool:
    return e["action"] in POSITIVE or (e["action"] == "dwell" and (e.get("dwell_ms") or 0) >= long_dwell_ms)


def enrich(element: tuple[int, dict[str, list[dict]]]) -> Iterable[dict]:
    """A post's engagements with its author, topic and content type (engagements of unknown posts dropped)."""
    _, g = element
    if not g["posts"]:
        return
    p = g["posts"][0]
    for e in g["engagements"]:
        yield {**e, "author_id": p["author_id"], "topic": p["topic"], "content_type": p["content_type"]}


def user_interest(element: tuple[int, Iterable[dict]], long_dwell_ms: int, ts_ms: int) -> dict:
    """One user's interest vector from their engagements of the window."""
    user, engs = element
    topics = np.zeros(N_TOPICS, dtype=np.float64)
    ctypes = np.zeros(len(CONTENT_TYPES), dtype=np.float64)
    authors: dict[int, int] = {}
    n = neg = 0
    for e in engs:
        if e["action"] in NEGATIVE_ACTION_NAMES:
            neg += 1
        if not is_positive(e, long_dwell_ms):
            continue
        n += 1
        if 0 <= e["topic"] < N_TOPICS:
            topics[e["topic"]] += 1
        ctypes[CONTENT_TYPES.index(e["content_type"])] += 1
        authors[e["author_id"]] = authors.get(e["author_id"], 0) + 1
    top = sorted(authors.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_AUTHORS]
    return {"user_id": user, "event_timestamp": ts_ms, "positive_engagements": n, "negative_feedback": neg,
            "topic_interest": (topics / max(n, 1)).astype(np.float32).tolist(),
            "ctype_interest": (ctypes / max(n, 1)).astype(np.float32).tolist(),
            "top_authors": [a for a, _ in top], "top_author_share": [c / max(n, 1) for _, c in top]}


def author_quality(element: tuple[int, dict[str, list]], ts_ms: int) -> Iterable[dict]:
    """One author's counts over the window; CTR smoothed as everywhere (:func:`features.vectors.rate`)."""
    from features.vectors import rate

    author, g = element
    imps = sum(g["impressions"])
    clicks = sum(1 for a in g["actions"] if a == "click")
    negs = sum(1 for a in g["actions"] if a in NEGATIVE_ACTION_NAMES)
    yield {"author_id": author, "event_timestamp": ts_ms, "impressions": imps, "clicks": clicks, "negatives": negs,
           "ctr": float(rate(clicks, imps)), "negative_rate": float(rate(negs, imps, prior=0.0)),
           "followers": max(0, sum(g["followers"]))}


def build(p: Any, cfg: Config, date: str, out: Path, ts_ms: int) -> None:
    import apache_beam as beam
    from apache_beam.io.parquetio import WriteToParquet

    from features.feast_repo import batch_schemas
    from features.lake import days
    from jobs.beam import dedupe, read_lake

    window = days(date, cfg.lake.interest_days)
    post_days = sorted({f.parent.parent.name[3:] for f in _post_files(cfg)} & set(days(date, 3650)))
    engagements = dedupe(read_lake(p, cfg, "engagements", window), "engagements")
    exposures = dedupe(read_lake(p, cfg, "exposures", window), "exposures")
    posts = dedupe(read_lake(p, cfg, "posts", post_days), "posts")
    enriched = ({"engagements": engagements | "eng by post" >> beam.Map(lambda e: (e["post_id"], e)),
                 "posts": posts | "post by id" >> beam.Map(lambda r: (r["post_id"], r))}
                | "join posts" >> beam.CoGroupByKey() | "enrich" >> beam.FlatMap(enrich))
    long_dwell = cfg.heads.long_dwell_ms
    (enriched | "by user" >> beam.Map(lambda e: (e["user_id"], e)) | "group user" >> beam.GroupByKey()
     | "interest" >> beam.Map(user_interest, long_dwell, ts_ms)
     | "write interest" >> WriteToParquet(str(out / "user_interest"), batch_schemas()["user_interest"],
                                          file_name_suffix=".parquet", num_shards=1, shard_name_template=""))
    imps = exposures | "imp by author" >> beam.Map(lambda r: (r["author_id"], 1)) | "imps" >> beam.CombinePerKey(sum)
    acts = enriched | "act by author" >> beam.Map(lambda e: (e["author_id"], e["action"]))
    followers = (read_lake(p, cfg, "follows", post_days, "follows")
                 | "follow delta" >> beam.Map(lambda r: (r["author_id"], 1 if r["followed"] else -1))
                 | "followers" >> beam.CombinePerKey(sum))
    ({"impressions": imps, "actions": acts, "followers": followers} | "by author" >> beam.CoGroupByKey()
     | "quality" >> beam.FlatMap(author_quality, ts_ms)
     | "write authors" >> WriteToParquet(str(out / "author_stats"), batch_schemas()["author_stats"],
                                         file_name_suffix=".parquet", num_shards=1, shard_name_template=""))


def _post_files(cfg: Config) -> list[Path]:
    from features.lake import files

    return files(cfg, "posts") + files(cfg, "follows")


def run(cfg: Config, date: str, runner: str = "DirectRunner", workers: int = 1,
        extra_options: list[str] | None = None, materialize: bool = True) -> dict[str, Any]:
    """Compute the batch features of the window ending ``date``, write them where the Feast views read
    them, and materialise them into the online store; returns what was written."""
    import datetime as dt

    import apache_beam as beam
    import pyarrow.parquet as pq

    from jobs.beam import pipeline_options

    out = cfg.data_dir / "feast"
    out.mkdir(parents=True, exist_ok=True)
    end = dt.datetime.fromisoformat(date).replace(tzinfo=dt.timezone.utc) + dt.timedelta(days=1) - dt.timedelta(milliseconds=1)
    ts_ms = int(end.timestamp() * 1000)
    t0 = time.monotonic()
    with beam.Pipeline(options=pipeline_options(runner, workers, extra_options)) as p:
        build(p, cfg, date, out, ts_ms)
    res: dict[str, Any] = {"date": date, "interest_days": cfg.lake.interest_days, "seconds": round(time.monotonic() - t0, 1)}
    for view in ("user_interest", "author_stats"):
        res[view] = {"rows": pq.ParquetFile(out / f"{view}.parquet").metadata.num_rows, "path": str(out / f"{view}.parquet")}
    if materialize:
        from features.feast_repo import apply, feature_store

        apply(cfg)
        t1 = time.monotonic()
        feature_store(cfg).materialize(start_date=end - dt.timedelta(days=cfg.lake.interest_days + 1),
                                       end_date=end + dt.timedelta(seconds=1), feature_views=["user_interest", "author_stats"])
        res["materialized_s"] = round(time.monotonic() - t1, 1)
    from features.connection import redis_client
    from features.feast_repo import BATCH_FEATURES_KEY

    redis_client(cfg).set(BATCH_FEATURES_KEY, f"{date}:{int(time.time())}")  # serving reloads on change
    return res
