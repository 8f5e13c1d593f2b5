"""The Feast repository: generate feature_store.yaml from feedrank.toml and export the
offline sources from a simulated world, so `feast apply` / `feast materialize` work
against the embedded Redis."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from core.config import PROJECT_ROOT, Config
from core.schema import POST_STATS_FLOAT, POST_STATS_INT, SESSION_LIKED, SESSION_VIEWED  # noqa: F401  (post_stats columns)
from features.vectors import rate

REPO = PROJECT_ROOT / "feast_repo"
TS = "event_timestamp"
#: Real-time views (written by the streaming feature job through their PushSource).
PUSHED_VIEWS = ("user_topic", "user_session", "user_embedding", "post_embedding", "post_stats", "topic_stats")
#: Batch views (materialized from the offline Parquet sources).
BATCH_VIEWS = ("user_profile", "post_content", "author_stats", "user_interest")
#: Redis key the batch features pipeline sets ("<date>:<unix time>") after materialising: serving reloads on change
BATCH_FEATURES_KEY = "feedrank:batch:features"
TOPIC_STATS_FLOAT = ("clicks_5m", "clicks_1h", "clicks_per_hour_longrun", "trend")


def definitions(data_dir: Path, lake_dir: Path | None = None) -> dict[str, Any]:
    """Every Feast object of feedrank, by variable name (the one place they are defined); with ``lake_dir``
    also a ``lake_<table>`` file source per table of the served-data lake (its compacted partitions:
    :func:`features.lake.compact`), for historical retrieval and ad-hoc reads through Feast."""
    from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
    from feast.types import Array, Bool, Float32, Int64

    data = Path(data_dir) / "feast"
    lake_sources: dict[str, Any] = {}
    if lake_dir is not None:
        from features.lake import TABLES

        lake_sources = {f"lake_{t}": FileSource(name=f"lake_{t}", path=str(Path(lake_dir) / t), timestamp_field="event_time",
                                                description=TABLES[t].doc) for t in TABLES}

    def file(name: str) -> FileSource:
        return FileSource(name=f"{name}_file", path=str(data / f"{name}.parquet"), timestamp_field=TS)

    def push(name: str) -> PushSource:
        return PushSource(name=f"{name}_push", batch_source=file(name))

    def view(name: str, entity: Any, ttl_days: float, fields: list[Any]) -> FeatureView:
        src = push(name) if name in PUSHED_VIEWS else file(name)
        return FeatureView(name=name, entities=[entity], ttl=timedelta(days=ttl_days), source=src, schema=fields)

    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="a reader")
    post = Entity(name="post", join_keys=["post_id"], value_type=ValueType.INT64, description="a post")
    author = Entity(name="author", join_keys=["author_id"], value_type=ValueType.INT64, description="a creator")
    topic = Entity(name="topic", join_keys=["topic_id"], value_type=ValueType.INT64, description="a content topic")
    f32s = Array(Float32)
    return {
        **lake_sources,
        "user": user, "post": post, "author": author, "topic": topic,
        "user_profile": view("user_profile", user, 365, [
            Field(name="follower_count", dtype=Int64), Field(name="following_count", dtype=Int64),
            Field(name="is_creator", dtype=Bool)]),
        # real-time: topic preferences with negative feedback, recent engagement
        "user_topic": view("user_topic", user, 30, [
            Field(name="topic_clicks", dtype=f32s), Field(name="topic_negative", dtype=f32s),
            Field(name="ctype_clicks", dtype=f32s), Field(name="clicks", dtype=Int64),
            Field(name="negatives", dtype=Int64), Field(name="clicks_1h", dtype=Int64),
            Field(name="last_engagement_ms", dtype=Int64)]),
        # real-time: the current session (views) and the last liked posts; post ids newest last
        "user_session": view("user_session", user, 1, [
            Field(name="viewed_posts", dtype=Array(Int64)), Field(name="liked_posts", dtype=Array(Int64)),
            Field(name="session_start_ms", dtype=Int64), Field(name="last_view_ms", dtype=Int64),
            Field(name="session_depth", dtype=Int64)]),
        # real-time: refreshed from the user tower on every engagement
        "user_embedding": view("user_embedding", user, 30, [Field(name="embedding", dtype=f32s)]),
        "post_content": view("post_content", post, 30, [
            Field(name="author_id", dtype=Int64), Field(name="topic", dtype=Int64),
            Field(name="content_type", dtype=Int64), Field(name="is_original", dtype=Bool),
            Field(name="policy_flagged", dtype=Bool), Field(name="published_ms", dtype=Int64)]),
        # real-time: written by the new-post path (post tower at publish time)
        "post_embedding": view("post_embedding", post, 30, [Field(name="embedding", dtype=f32s)]),
        # real-time engagement statistics
        "post_stats": view("post_stats", post, 7, [Field(name=n, dtype=Int64) for n in POST_STATS_INT]
                           + [Field(name=n, dtype=Float32) for n in POST_STATS_FLOAT]),
        # real-time: per-topic click velocity and trend (last hour vs long-run rate)
        "topic_stats": view("topic_stats", topic, 7, [Field(name=n, dtype=Float32) for n in TOPIC_STATS_FLOAT]),
        # batch (jobs/batch_features.py from the lake; `feast export` from a simulated world)
        "author_stats": view("author_stats", author, 30, [
            Field(name="followers", dtype=Int64), Field(name="impressions", dtype=Int64),
            Field(name="clicks", dtype=Int64), Field(name="negatives", dtype=Int64), Field(name="ctr", dtype=Float32),
            Field(name="negative_rate", dtype=Float32)]),
        # batch: the user's 30-day interest (shares of positive engagements) over topics, content types, authors
        "user_interest": view("user_interest", user, 30, [
            Field(name="positive_engagements", dtype=Int64), Field(name="negative_feedback", dtype=Int64),
            Field(name="topic_interest", dtype=f32s), Field(name="ctype_interest", dtype=f32s),
            Field(name="top_authors", dtype=Array(Int64)), Field(name="top_author_share", dtype=f32s)]),
    }


def batch_schemas() -> dict[str, Any]:
    """The Parquet schemas of the batch views the lake's batch pipeline writes (jobs/batch_features.py)."""
    import pyarrow as pa

    ts = pa.timestamp("ms", tz="UTC")
    return {
        "user_interest": pa.schema([("user_id", pa.int64()), (TS, ts), ("positive_engagements", pa.int64()),
                                    ("negative_feedback", pa.int64()), ("topic_interest", pa.list_(pa.float32())),
                                    ("ctype_interest", pa.list_(pa.float32())), ("top_authors", pa.list_(pa.int64())),
                                    ("top_author_share", pa.list_(pa.float32()))]),
        "author_stats": pa.schema([("author_id", pa.int64()), (TS, ts), ("impressions", pa.int64()),
                                   ("clicks", pa.int64()), ("negatives", pa.int64()), ("ctr", pa.float32()),
                                   ("negative_rate", pa.float32()), ("followers", pa.int64())]),
    }


def topic_trend(clicks_1h: Any, longrun_per_hour: Any) -> Any:
    """Log lift of a topic's last-hour clicks over its long-run hourly rate (+1 smoothing).

    The one definition used offline, by the streaming job and in serving."""
    return np.log((np.asarray(clicks_1h, dtype=np.float64) + 1.0) / (np.asarray(longrun_per_hour, dtype=np.float64) + 1.0))


def post_trending_score(clicks_1h: Any, clicks_total: Any) -> Any:
    """Log lift of a post's last-hour clicks over its average hour of a day's worth of clicks."""
    return np.log1p(np.asarray(clicks_1h, dtype=np.float64)) - np.log1p(np.asarray(clicks_total, dtype=np.float64) / 24.0)


def redis_connection_string(cfg: Config) -> str:
    u = urlparse(cfg.redis.uri)
    db = (u.path or "/0").strip("/") or "0"
    return f"{u.hostname}:{u.port or 6379},db={db}"


def feature_store(cfg: Config) -> Any:
    """A FeatureStore built from feedrank.toml alone (jobs and serving: no YAML, no cwd)."""
    from feast import FeatureStore, RepoConfig

    (cfg.data_dir / "feast").mkdir(parents=True, exist_ok=True)
    rc = RepoConfig(project="feedrank", provider="local",
                    registry=str(cfg.data_dir / "feast" / "registry.db"),
                    online_store={"type": "redis", "connection_string": redis_connection_string(cfg)},
                    offline_store={"type": "file"}, entity_key_serialization_version=3,
                    repo_path=REPO)
    return FeatureStore(config=rc)


def apply(cfg: Config) -> Any:
    """Register every definition (what `feast apply` does), for jobs started on a fresh stack."""
    store = feature_store(cfg)
    from features.lake import lake_dir

    store.apply(list(definitions(cfg.data_dir, lake_dir(cfg)).values()))
    return store


def feature_store_yaml(cfg: Config, repo: Path = REPO) -> str:
    import os

    registry = os.path.relpath(cfg.data_dir / "feast" / "registry.db", repo)  # relative: works in any clone
    return (
        "# written by `feedrank feast configure` from feedrank.toml; edits are overwritten\n"
        "project: feedrank\n"
        "provider: local\n"
        f"registry: {registry}\n"
        "online_store:\n"
        "  type: redis\n"
        f"  connection_string: \"{redis_connection_string(cfg)}\"\n"
        "offline_store:\n"
        "  type: file\n"
        "entity_key_serialization_version: 3\n"
    )


def configure(cfg: Config, repo: Path = REPO) -> Path:
    """Write feature_store.yaml into ``repo`` (and make the data directory)."""
    (cfg.data_dir / "feast").mkdir(parents=True, exist_ok=True)
    repo.mkdir(parents=True, exist_ok=True)
    if repo != REPO:
        shutil.copy2(REPO / "definitions.py", repo / "definitions.py")
    path = repo / "feature_store.yaml"
    path.write_text(feature_store_yaml(cfg, repo))
    return path


def export(cfg: Config, world_dir: Path) -> dict[str, int]:
    """Offline sources from a data directory (:mod:`core.corpus`), as of the end of its history."""
    from core.corpus import Corpus
    from core.units import HOUR_MS
    from features.offline import History

    out = cfg.data_dir / "feast"
    out.mkdir(parents=True, exist_ok=True)
    world = Corpus.load_corpus(world_dir)
    hist = History.load(world_dir, world)
    t = world.end_ms
    ts = pd.Timestamp(t, unit="ms", tz="UTC")
    users = pq.read_table(world_dir / "users.parquet").to_pandas()
    n = {}

    def write(name: str, df: pd.DataFrame) -> None:
        df["event_timestamp"] = df.get("event_timestamp", ts)
        df.to_parquet(out / f"{name}.parquet", index=False)
        n[name] = len(df)

    write("user_profile", users[["user_id", "follower_count", "following_count", "is_creator"]].copy())
    posts = np.arange(world.n_posts)
    write("post_content", pd.DataFrame({
        "post_id": posts, "author_id": world.post_author, "topic": world.post_topic.astype(np.int64),
        "content_type": world.post_ctype.astype(np.int64), "is_original": world.post_original,
        "policy_flagged": world.post_flagged, "published_ms": world.post_ts,
        "event_timestamp": pd.to_datetime(world.post_ts, unit="ms", utc=True)}))
    tt = np.full(posts.size, t)
    c = {k: hist.post[k].before(posts, tt)
         for k in ("impressions", "clicks", "likes", "comments", "shares", "negative", "long_dwell")}
    c5 = hist.post["clicks"].between(posts, tt - 300_000, tt)
    c1h = hist.post["clicks"].between(posts, tt - HOUR_MS, tt)
    ctr = rate(c["clicks"], c["impressions"])
    write("post_stats", pd.DataFrame({
        "post_id": posts, "impressions": c["impressions"], "clicks": c["clicks"], "likes": c["likes"],
        "comments": c["comments"], "shares": c["shares"], "negatives": c["negative"], "long_dwells": c["long_dwell"],
        "clicks_5m": c5, "clicks_1h": c1h,
        "ctr": ctr.astype(np.float32), "trending_score": post_trending_score(c1h, c["clicks"]).astype(np.float32)}))
    uids = np.arange(world.n_users)
    st = hist.user_state(uids, np.full(uids.size, t))
    write("user_topic", pd.DataFrame({
        "user_id": uids, "topic_clicks": list(st.topic_clicks), "topic_negative": list(st.topic_neg),
        "ctype_clicks": list(st.ctype_clicks), "clicks": hist.user_clicks.before(uids, np.full(uids.size, t)),
        "negatives": hist.user_neg.before(uids, np.full(uids.size, t)),
        "clicks_1h": hist.user_clicks.between(uids, np.full(uids.size, t - HOUR_MS), np.full(uids.size, t)),
        "last_engagement_ms": np.zeros(uids.size, dtype=np.int64)}))
    v = hist.views.last_row(uids, np.full(uids.size, t + 1))
    vx, has = hist.views, v >= 0
    first = vx.run_first[np.maximum(v, 0)] if vx.ts.size else np.zeros(uids.size, dtype=np.int64)
    last_views = hist.views.last(v, SESSION_VIEWED, same_run=True)
    liked = hist.likes.last(hist.likes.last_row(uids, np.full(uids.size, t + 1)), SESSION_LIKED)
    write("user_session", pd.DataFrame({
        "user_id": uids, "viewed_posts": [[int(p) for p in r if p >= 0] for r in last_views],
        "liked_posts": [[int(p) for p in r if p >= 0] for r in liked],
        "session_start_ms": np.where(has, vx.ts[first] if vx.ts.size else 0, 0).astype(np.int64),
        "last_view_ms": np.where(has, vx.ts[np.maximum(v, 0)] if vx.ts.size else 0, 0).astype(np.int64),
        "session_depth": np.where(has, np.maximum(v, 0) - first + 1, 0).astype(np.int64)}))
    k = world.n_topics
    t5 = np.bincount(world.post_topic, weights=c5, minlength=k)
    t1h = np.bincount(world.post_topic, weights=c1h, minlength=k)
    longrun = np.bincount(world.post_topic, weights=c["clicks"], minlength=k) / max((t - world.start_ms) / HOUR_MS, 1.0)
    write("topic_stats", pd.DataFrame({
        "topic_id": np.arange(k), "clicks_5m": t5.astype(np.float32), "clicks_1h": t1h.astype(np.float32),
        "clicks_per_hour_longrun": longrun.astype(np.float32),
        "trend": topic_trend(t1h, longrun).astype(np.float32)}))
    a_imp = hist.author["impressions"].before(uids, np.full(uids.size, t))
    a_clk = hist.author["clicks"].before(uids, np.full(uids.size, t))
    a_neg = hist.author["negative"].before(uids, np.full(uids.size, t))
    write("author_stats", pd.DataFrame({
        "author_id": uids, "followers": world.follower_counts(), "impressions": a_imp, "clicks": a_clk,
        "negatives": a_neg.astype(np.int64), "ctr": rate(a_clk, a_imp).astype(np.float32),
        "negative_rate": rate(a_neg, a_imp, prior=0.0).astype(np.float32)}))
    if not (out / "user_interest.parquet").exists():  # computed from the lake: `feedrank batch run features`
        pq.write_table(batch_schemas()["user_interest"].empty_table(), out / "user_interest.parquet")
    for name, key in (("user_embedding", "user_id"), ("post_embedding", "post_id")):
        if not (out / f"{name}.parquet").exists():  # pushed by the streaming jobs only: an empty batch source
            import pyarrow as pa

            pq.write_table(pa.table({key: pa.array([], pa.int64()), "embedding": pa.array([], pa.list_(pa.float32())),
                                     TS: pa.array([], pa.timestamp("us", tz="UTC"))}), out / f"{name}.parquet")
    return n
