"""The Feast repository: generate feature_store.yaml from feedrank.toml and export the
offline sources from a simulated world, so `feast apply` / `feast materialize` work
against the embedded Redis."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from feedrank.config import PROJECT_ROOT, Config

REPO = PROJECT_ROOT / "feast_repo"


def feature_store_yaml(cfg: Config, repo: Path = REPO) -> str:
    import os

    u = urlparse(cfg.redis.uri)
    db = (u.path or "/0").strip("/") or "0"
    registry = os.path.relpath(cfg.data_dir / "feast" / "registry.db", repo)  # relative: works in any clone
    return (
        "# written by `feedrank feast configure` from feedrank.toml; edits are overwritten\n"
        "project: feedrank\n"
        "provider: local\n"
        f"registry: {registry}\n"
        "online_store:\n"
        "  type: redis\n"
        f"  connection_string: \"{u.hostname}:{u.port or 6379},db={db}\"\n"
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
    """Offline sources from a simulated world, as of the end of its history."""
    from features.offline import History
    from sim.world import HOUR_MS, World

    out = cfg.data_dir / "feast"
    out.mkdir(parents=True, exist_ok=True)
    world = World.load(world_dir)
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
    c = {k: hist.post[k].before(posts, tt) for k in ("impressions", "clicks", "likes", "comments", "shares", "negative")}
    c5 = hist.post["clicks"].between(posts, tt - 300_000, tt)
    c1h = hist.post["clicks"].between(posts, tt - HOUR_MS, tt)
    ctr = (c["clicks"] + 2.0) / (c["impressions"] + 20.0)
    write("post_stats", pd.DataFrame({
        "post_id": posts, "impressions": c["impressions"], "clicks": c["clicks"], "likes": c["likes"],
        "comments": c["comments"], "shares": c["shares"], "negatives": c["negative"], "clicks_5m": c5, "clicks_1h": c1h,
        "ctr": ctr.astype(np.float32), "trending_score": (np.log1p(c1h) - np.log1p(c["clicks"] / 24.0)).astype(np.float32)}))
    uids = np.arange(world.n_users)
    st = hist.user_state(uids, np.full(uids.size, t))
    write("user_topic", pd.DataFrame({
        "user_id": uids, "topic_clicks": list(st.topic_clicks), "topic_negative": list(st.topic_neg),
        "ctype_clicks": list(st.ctype_clicks), "clicks": hist.user_clicks.before(uids, np.full(uids.size, t)),
        "negatives": hist.user_neg.before(uids, np.full(uids.size, t))}))
    a_imp = hist.author["impressions"].before(uids, np.full(uids.size, t))
    a_clk = hist.author["clicks"].before(uids, np.full(uids.size, t))
    write("author_stats", pd.DataFrame({
        "author_id": uids, "followers": world.follower_counts(), "impressions": a_imp, "clicks": a_clk,
        "ctr": ((a_clk + 2.0) / (a_imp + 20.0)).astype(np.float32)}))
    return n
