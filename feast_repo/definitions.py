"""Feast definitions for feedrank: entities, feature views and push sources.

Offline sources are Parquet files under ``<data_dir>/feast`` (written by
``feedrank feast export`` from the simulated world's logs); real-time views also have a
PushSource, through which the streaming feature job writes fresh values to the online
store (Redis). Feature names and bounds come from :mod:`features.schema`.
"""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Bool, Float32, Int64

from feedrank.config import get_config

DATA = get_config().data_dir / "feast"
TS = "event_timestamp"

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="a reader")
post = Entity(name="post", join_keys=["post_id"], value_type=ValueType.INT64, description="a post")
author = Entity(name="author", join_keys=["author_id"], value_type=ValueType.INT64, description="a creator")


def _file(name: str) -> FileSource:
    return FileSource(name=f"{name}_file", path=str(DATA / f"{name}.parquet"), timestamp_field=TS)


def _push(name: str) -> PushSource:
    return PushSource(name=f"{name}_push", batch_source=_file(name))


user_profile = FeatureView(
    name="user_profile", entities=[user], ttl=timedelta(days=365), source=_file("user_profile"),
    schema=[Field(name="follower_count", dtype=Int64), Field(name="following_count", dtype=Int64),
            Field(name="is_creator", dtype=Bool)],
)
user_topic = FeatureView(  # real-time: topic preferences with negative feedback
    name="user_topic", entities=[user], ttl=timedelta(days=30), source=_push("user_topic"),
    schema=[Field(name="topic_clicks", dtype=Array(Float32)), Field(name="topic_negative", dtype=Array(Float32)),
            Field(name="ctype_clicks", dtype=Array(Float32)), Field(name="clicks", dtype=Int64),
            Field(name="negatives", dtype=Int64)],
)
user_embedding = FeatureView(  # real-time: refreshed from the user tower on every engagement
    name="user_embedding", entities=[user], ttl=timedelta(days=30), source=_push("user_embedding"),
    schema=[Field(name="embedding", dtype=Array(Float32))],
)
post_content = FeatureView(
    name="post_content", entities=[post], ttl=timedelta(days=30), source=_file("post_content"),
    schema=[Field(name="author_id", dtype=Int64), Field(name="topic", dtype=Int64), Field(name="content_type", dtype=Int64),
            Field(name="is_original", dtype=Bool), Field(name="policy_flagged", dtype=Bool),
            Field(name="published_ms", dtype=Int64)],
)
post_embedding = FeatureView(
    name="post_embedding", entities=[post], ttl=timedelta(days=30), source=_push("post_embedding"),
    schema=[Field(name="embedding", dtype=Array(Float32))],
)
post_stats = FeatureView(  # real-time engagement statistics
    name="post_stats", entities=[post], ttl=timedelta(days=7), source=_push("post_stats"),
    schema=[Field(name=n, dtype=Int64) for n in ("impressions", "clicks", "likes", "comments", "shares", "negatives",
                                                 "clicks_5m", "clicks_1h")]
    + [Field(name="ctr", dtype=Float32), Field(name="trending_score", dtype=Float32)],
)
author_stats = FeatureView(
    name="author_stats", entities=[author], ttl=timedelta(days=30), source=_push("author_stats"),
    schema=[Field(name="followers", dtype=Int64), Field(name="impressions", dtype=Int64), Field(name="clicks", dtype=Int64),
            Field(name="ctr", dtype=Float32)],
)
