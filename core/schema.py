"""Every ranking feature, defined once: name, group and bounds.

Training (offline point-in-time features), the streaming jobs and serving all build
vectors in this order, and the model store records :func:`schema_hash` with every
checkpoint so a model is never fed vectors of another layout. Bounds are the clip range
applied before scoring; the rankers then clip standardised values at ``training.heavy_feature_clip``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from core.events import NEGATIVE_ACTIONS

N_TOPICS = 24
N_CTYPES = 3
EMB_DIM = 128
HEAD_NAMES = ("click", "like", "comment", "share", "long_dwell", "negative")
NEGATIVE_ACTION_NAMES = frozenset(a.value for a in NEGATIVE_ACTIONS)


def head_labels(engagements: list[tuple[str, int, int]], long_dwell_ms: int) -> tuple[int, ...]:
    """The six head labels (HEAD_NAMES order) of one exposure from its attributed (action, ts, dwell_ms)
    engagements: the online learner and the batch training sets label with this one function."""
    acts = {a for a, _, _ in engagements}
    long_dwell = any(a == "dwell" and d >= long_dwell_ms for a, _, d in engagements)
    return (int("click" in acts), int("like" in acts), int("comment" in acts), int("share" in acts),
            int(long_dwell), int(bool(acts & NEGATIVE_ACTION_NAMES)))


@dataclass(frozen=True)
class Feature:
    name: str
    group: str
    lo: float = -1e9
    hi: float = 1e9
    doc: str = ""


def _block(prefix: str, n: int, group: str, lo: float, hi: float, doc: str) -> list[Feature]:
    return [Feature(f"{prefix}_{i}", group, lo, hi, doc) for i in range(n)]


#: The ~20 cheap features of the light ranker (10K candidates per request).
LIGHT_FEATURES: list[Feature] = [
    Feature("recency", "post", 0, 1, "exp(-age_hours / 12)"),
    Feature("log_age_hours", "post", 0, 8, "log1p(age in hours)"),
    Feature("log_author_affinity", "cross", 0, 8, "log1p(user's past engagements with the author)"),
    Feature("follows_author", "cross", 0, 1, "user follows the author"),
    Feature("in_network", "source", 0, 1, "candidate came from the follow graph"),
    Feature("ann_score", "cross", -1, 1, "two-tower cosine similarity"),
    Feature("topic_match", "cross", 0, 1, "share of the user's positive engagements on the post's topic"),
    Feature("topic_negative", "cross", 0, 1, "share of the user's negative feedback on the post's topic"),
    Feature("ctype_match", "cross", 0, 1, "share of the user's positive engagements on the post's content type"),
    Feature("post_ctr", "post", 0, 1, "smoothed click-through rate"),
    Feature("post_like_rate", "post", 0, 1, "smoothed likes per impression"),
    Feature("post_negative_rate", "post", 0, 1, "smoothed negative feedback per impression"),
    Feature("log_velocity_1h", "post", 0, 10, "log1p(clicks in the last hour)"),
    Feature("log_post_impressions", "post", 0, 15, "log1p(impressions)"),
    Feature("topic_trend", "post", -5, 5, "topic click-rate lift of the last hour vs its long-run rate"),
    Feature("log_author_followers", "author", 0, 15, "log1p(followers)"),
    Feature("author_ctr", "author", 0, 1, "smoothed click-through rate of the author's posts"),
    Feature("is_original", "post", 0, 1, "original post rather than a repost"),
    Feature("policy_flagged", "post", 0, 1, "flagged by content policy"),
    Feature("log_user_activity", "user", 0, 12, "log1p(user's clicks so far)"),
]

#: Heavy ranker: the light features plus embeddings, topic profiles and context (~300).
HEAVY_EXTRA: list[Feature] = (
    _block("user_emb", EMB_DIM, "user_embedding", -1, 1, "two-tower user embedding")
    + _block("post_emb", EMB_DIM, "post_embedding", -1, 1, "two-tower post embedding")
    + _block("user_topic", N_TOPICS, "user_topic", 0, 1, "share of the user's positive engagements per topic")
    + _block("post_ctype", N_CTYPES, "post", 0, 1, "content type one-hot")
    # a topic's appeal can jump before its new posts have counts: the online learner moves these weights
    + _block("post_topic", N_TOPICS, "post_topic", 0, 1, "topic one-hot")
    + [Feature("user_topic_neg_total", "user_topic", 0, 1, "user's negative feedback share overall"),
       Feature("post_comment_rate", "post", 0, 1, "smoothed comments per impression"),
       Feature("post_share_rate", "post", 0, 1, "smoothed shares per impression"),
       Feature("post_long_dwell_rate", "post", 0, 1, "smoothed long dwells per impression"),
       Feature("hour_sin", "context", -1, 1, "time of day"),
       Feature("hour_cos", "context", -1, 1, "time of day"),
       # the session (seed 003): read at request time from the feature job's user_session view
       Feature("log_session_depth", "session", 0, 8, "log1p(posts viewed in the current session)"),
       Feature("log_session_minutes", "session", 0, 6, "log1p(minutes since the current session began)"),
       Feature("session_topic_viewed", "session", 0, 1, "share of the last 10 viewed posts on the post's topic"),
       Feature("recent_topic_liked", "session", 0, 1, "share of the last 5 liked posts on the post's topic"),
       Feature("recent_author_liked", "session", 0, 1, "share of the last 5 liked posts by the post's author")]
)
#: How many recent views and likes the user_session view keeps (the session features above), and the
#: pause after which the next view starts a new session. Part of the features' definition (a model is
#: trained with them), so kept here rather than in feedrank.toml.
SESSION_VIEWED, SESSION_LIKED = 10, 5
SESSION_GAP_MS = 30 * 60_000
HEAVY_FEATURES: list[Feature] = LIGHT_FEATURES + HEAVY_EXTRA
#: What the ranker that logged the history ranked by (the V0/EdgeRank-style production
#: ranker): propensity estimation conditions on these, because given them the logged
#: position is independent of relevance.
LOGGING_POLICY_FEATURES = ["recency", "log_age_hours", "in_network", "follows_author", "log_author_followers",
                           "post_ctype_0", "post_ctype_1", "post_ctype_2"]
LIGHT_NAMES = [f.name for f in LIGHT_FEATURES]
HEAVY_NAMES = [f.name for f in HEAVY_FEATURES]


def schema_hash(features: list[Feature]) -> str:
    """Stable hash of names, order and bounds: stored with every checkpoint."""
    text = "|".join(f"{f.name}:{f.lo}:{f.hi}" for f in features)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: What the serving code's feature rows are: a model trained on another schema is refused at load.
LIGHT_SCHEMA_HASH, HEAVY_SCHEMA_HASH = schema_hash(LIGHT_FEATURES), schema_hash(HEAVY_FEATURES)


def bounds(features: list[Feature]) -> tuple[list[float], list[float]]:
    return [f.lo for f in features], [f.hi for f in features]

#: The post_stats rows (Feast view, PostStatsCache arrays): integer columns, then float ones, by name.
POST_STATS_INT = ("impressions", "clicks", "likes", "comments", "shares", "negatives", "long_dwells",
                  "clicks_5m", "clicks_1h")
POST_STATS_FLOAT = ("ctr", "trending_score")
POST_STAT = {name: i for i, name in enumerate(POST_STATS_INT)}   # column of each in PostStatsCache.ints
