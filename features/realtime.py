"""Real-time feature state: the per-post, per-user and per-topic arithmetic of the feature job.

Kept apart from the Flink wiring (``jobs/feature_job.py``) so that the exact rules are
plain functions with plain tests, and so the values the job pushes are defined once:

* post stats: counts of impressions (exposures), clicks, likes, comments, shares,
  negative feedback (hide / not interested / see less) and long dwells; clicks in the
  last 5 minutes and hour (per-minute buckets, event time); smoothed CTR; trending score.
* user topic: positive engagements and negative feedback per topic, positive engagements per
  content type, recent engagement — and the user tower's dense input built from them.
* user session: the current session's last viewed posts, start and depth, the last liked posts.
* topic stats: clicks in the last 5 minutes / hour against the topic's long-run rate.

State values are small lists (pickled by Flink); every update is idempotent given the
state, so a replay from a checkpoint reproduces the same values: the job pushes
absolute values, never increments.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.events import NEGATIVE_ACTIONS, Action, InvalidEvent, parse_event, parse_events
from features.feast_repo import post_trending_score, topic_trend
from features.vectors import rate
from core.schema import N_CTYPES, N_TOPICS, POST_STAT, SESSION_GAP_MS, SESSION_LIKED, SESSION_VIEWED
from core.units import HOUR_MS, MINUTE_MS

CTYPE_CODE = {"text": 0, "image": 1, "video": 2}
ACTIONS = [a.value for a in Action]
A = {a: i for i, a in enumerate(ACTIONS)}
NEGATIVE_CODES = frozenset(A[a.value] for a in NEGATIVE_ACTIONS)

# event kinds of the compact tuple
PUBLISH, FOLLOW, UNFOLLOW, EXPOSURE, ENGAGEMENT, FEEDBACK = range(6)
KIND = {"post_published": PUBLISH, "followed": FOLLOW, "unfollowed": UNFOLLOW, "exposure": EXPOSURE,
        "engagement": ENGAGEMENT, "feedback": FEEDBACK}
USER_KEYED = (FOLLOW, UNFOLLOW, FEEDBACK)  # events about a user, not a post: keyed and applied by user
# compact event: (kind, event_id, ts, user_id, post_id, author_id, action, dwell_ms, topic, ctype, text, position)
Compact = tuple
K_KIND, K_ID, K_TS, K_USER, K_POST, K_AUTHOR, K_ACTION, K_DWELL, K_TOPIC, K_CTYPE, K_TEXT, K_POS = range(12)


def compact(line: str) -> Compact | str:
    """Validate one JSON line into the job's compact tuple, or return the rejection reason."""
    try:
        return compact_event(parse_event(line))
    except InvalidEvent as e:
        return e.reason


#: event types the real-time features do not read (served feature rows and shadow scores: for the lake)
SKIPPED = frozenset({"features_served", "shadow_scored"})
_SKIP_MARKS = tuple(f'"type":"{t}"' for t in SKIPPED)


def compact_many(lines: list[str]) -> list[Compact | str]:
    """:func:`compact` of a bundle's events, validated together (core.events.parse_events); events of
    the :data:`SKIPPED` types are left out (before validation when written canonically: they are large)."""
    lines = [ln for ln in lines if not any(m in ln for m in _SKIP_MARKS)]
    return [ev.reason if isinstance(ev, InvalidEvent) else compact_event(ev) for ev in parse_events(lines)
            if isinstance(ev, InvalidEvent) or ev.type not in SKIPPED]


def compact_event(ev: Any) -> Compact:
    """The job's compact tuple of a validated event."""
    k = KIND[ev.type]
    if k == PUBLISH:
        return (k, ev.event_id, ev.ts, ev.author_id, ev.post_id, ev.author_id, -1, 0, ev.topic,
                CTYPE_CODE[ev.content_type], ev.text, 0)
    if k in (FOLLOW, UNFOLLOW):
        return (k, ev.event_id, ev.ts, ev.user_id, -1, ev.author_id, -1, 0, -1, -1, "", 0)
    if k == FEEDBACK:  # a negative action on the topic (or only the author): user_update counts it as one
        return (k, ev.event_id, ev.ts, ev.user_id, -1, ev.author_id if ev.author_id is not None else -1,
                A[ev.action], 0, ev.topic if ev.topic is not None else -1, -1, "", 0)
    if k == EXPOSURE:
        return (k, ev.event_id, ev.ts, ev.user_id, ev.post_id, ev.author_id if ev.author_id is not None else -1,
                -1, 0, -1, -1, "", ev.position)
    return (k, ev.event_id, ev.ts, ev.user_id, ev.post_id, ev.author_id if ev.author_id is not None else -1,
            A[ev.action], ev.dwell_ms or 0, -1, -1, "", ev.position or 0)


# ----------------------------------------------------------------------------- buckets


def bump(buckets: dict[int, int], ts: int, n: int = 1) -> None:
    """Count ``n`` at the minute of ``ts``; forget minutes older than an hour before it."""
    m = ts // MINUTE_MS
    buckets[m] = buckets.get(m, 0) + n
    if len(buckets) > 61:
        for old in [b for b in buckets if b <= m - 60]:
            del buckets[old]


def window(buckets: dict[int, int], now_ms: int, minutes: int) -> int:
    """Clicks in the ``minutes`` minute buckets ending with the one holding ``now_ms``."""
    m = now_ms // MINUTE_MS
    return sum(c for b, c in buckets.items() if m - minutes < b <= m)


# ----------------------------------------------------------------------------- posts

# post state: [impressions, clicks, likes, comments, shares, negatives, long_dwells, last_ts, buckets, meta]
# meta = (author_id, topic, ctype, published_ms) once known, else None
P_IMP, P_CLK, P_LIKE, P_COMM, P_SHARE, P_NEG, P_LDW, P_LAST, P_BUCKETS, P_META = range(10)


def new_post_state(meta: tuple[int, int, int, int] | None = None) -> list:
    return [0, 0, 0, 0, 0, 0, 0, 0, {}, meta]


def post_update(s: list, e: Compact, long_dwell_ms: int) -> bool:
    """Apply one exposure/engagement/publish event; True when it changed a pushed value."""
    k = e[K_KIND]
    s[P_LAST] = max(s[P_LAST], e[K_TS])
    if k == EXPOSURE:
        s[P_IMP] += 1
        return True
    if k == PUBLISH:
        s[P_META] = (e[K_AUTHOR], e[K_TOPIC], e[K_CTYPE], e[K_TS])
        return True
    a = e[K_ACTION]
    if a == A["click"]:
        s[P_CLK] += 1
        bump(s[P_BUCKETS], e[K_TS])
    elif a == A["like"]:
        s[P_LIKE] += 1
    elif a == A["comment"]:
        s[P_COMM] += 1
    elif a == A["share"]:
        s[P_SHARE] += 1
    elif a in NEGATIVE_CODES:
        s[P_NEG] += 1
    elif a == A["dwell"] and e[K_DWELL] >= long_dwell_ms:
        s[P_LDW] += 1
    else:
        return False  # views and short dwells change nothing we publish
    return True


def post_row(s: list, now_ms: int | None = None) -> tuple[list[int], list[float]]:
    """(ints in POST_STATS_INT order, floats in POST_STATS_FLOAT order)."""
    now = s[P_LAST] if now_ms is None else now_ms
    c5, c1h = window(s[P_BUCKETS], now, 5), window(s[P_BUCKETS], now, 60)
    ctr = rate(s[P_CLK], s[P_IMP])
    trend = float(post_trending_score(c1h, s[P_CLK]))
    return [s[P_IMP], s[P_CLK], s[P_LIKE], s[P_COMM], s[P_SHARE], s[P_NEG], s[P_LDW], c5, c1h], [ctr, trend]


def post_rows(rows: list[tuple[list, int | None]]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`post_row` of many ``(state, now_ms)`` at once: ints [n, 9] int64, floats [n, 2] float32."""
    ints = np.zeros((len(rows), 9), dtype=np.int64)
    ints[:, :7] = [s[:7] for s, _ in rows]
    for i, (s, now) in enumerate(rows):
        if s[P_BUCKETS]:  # most posts have no recent clicks
            t = s[P_LAST] if now is None else now
            ints[i, POST_STAT["clicks_5m"]], ints[i, POST_STAT["clicks_1h"]] = window(s[P_BUCKETS], t, 5), window(s[P_BUCKETS], t, 60)
    clk = ints[:, P_CLK].astype(np.float64)
    floats = np.stack([rate(clk, ints[:, P_IMP]), post_trending_score(ints[:, POST_STAT["clicks_1h"]], clk)], axis=1)
    return ints, floats.astype(np.float32)


# ----------------------------------------------------------------------------- users

# user state: [topic_pos[T], topic_neg[T], ctype_pos[3], clicks, negatives, last_ms, buckets, follows,
#              viewed, liked, session_start_ms, last_view_ms, session_depth]
# topic_pos / ctype_pos count positive engagements (core.events.is_positive: clicks, likes, comments, shares,
# long dwells); viewed holds the current session's last SESSION_VIEWED post ids, liked the last SESSION_LIKED.
U_TC, U_TN, U_CC, U_CLK, U_NEG, U_LAST, U_BUCKETS, U_FOLLOWS, U_VIEWED, U_LIKED, U_SSTART, U_LASTVIEW, U_DEPTH = range(13)
MAX_FOLLOWS_KEPT = 200
_POSITIVE_CODES = frozenset(A[a] for a in ("click", "like", "comment", "share"))


def new_user_state(follows: list[int] | None = None) -> list:
    return [[0] * N_TOPICS, [0] * N_TOPICS, [0] * N_CTYPES, 0, 0, 0, {}, list(follows or []), [], [], 0, 0, 0]


def user_update(s: list, e: Compact, long_dwell_ms: int) -> tuple[bool, bool, bool]:
    """Apply an enriched engagement (a view included), author/topic feedback or a follow change. Returns
    whether it changed (the user_topic row, the embedding input, the user_session row)."""
    if len(s) < U_DEPTH + 1:  # a state checkpointed before the session fields existed
        s.extend(new_user_state()[len(s):])
    k = e[K_KIND]
    if k == FOLLOW:
        if e[K_AUTHOR] not in s[U_FOLLOWS]:
            s[U_FOLLOWS].append(e[K_AUTHOR])
            del s[U_FOLLOWS][:-MAX_FOLLOWS_KEPT]
        return False, True, False
    if k == UNFOLLOW:
        if e[K_AUTHOR] in s[U_FOLLOWS]:
            s[U_FOLLOWS].remove(e[K_AUTHOR])
        return False, True, False
    a, topic, ctype, ts = e[K_ACTION], e[K_TOPIC], e[K_CTYPE], e[K_TS]
    if a == A["view"]:
        if ts < s[U_LASTVIEW]:
            return False, False, False  # late views do not reorder a session already pushed
        if not s[U_LASTVIEW] or ts - s[U_LASTVIEW] > SESSION_GAP_MS:
            s[U_SSTART], s[U_DEPTH], s[U_VIEWED] = ts, 0, []
        s[U_LASTVIEW] = ts
        s[U_DEPTH] += 1
        s[U_VIEWED].append(e[K_POST])
        del s[U_VIEWED][:-SESSION_VIEWED]
        return False, False, True
    s[U_LAST] = max(s[U_LAST], ts)
    if a in _POSITIVE_CODES or (a == A["dwell"] and e[K_DWELL] >= long_dwell_ms):
        if a == A["click"]:
            s[U_CLK] += 1
            bump(s[U_BUCKETS], ts)
        if 0 <= topic < N_TOPICS:
            s[U_TC][topic] += 1
        if 0 <= ctype < N_CTYPES:
            s[U_CC][ctype] += 1
        liked = a == A["like"]
        if liked:
            s[U_LIKED].append(e[K_POST])
            del s[U_LIKED][:-SESSION_LIKED]
        return True, True, liked
    if a in NEGATIVE_CODES:
        s[U_NEG] += 1
        if 0 <= topic < N_TOPICS:
            s[U_TN][topic] += 1
        return True, True, False
    return True, False, False  # any other engagement still moves last_engagement_ms


def _shares(v: list[int]) -> list[float]:
    n = max(sum(v), 1)
    return [x / n for x in v]


def user_row(s: list) -> dict[str, Any]:
    """The user_topic view's values: shares (as the offline export and the rankers use), counts, recency."""
    return {"topic_clicks": _shares(s[U_TC]), "topic_negative": _shares(s[U_TN]), "ctype_clicks": _shares(s[U_CC]),
            "clicks": s[U_CLK], "negatives": s[U_NEG], "clicks_1h": window(s[U_BUCKETS], s[U_LAST], 60),
            "last_engagement_ms": s[U_LAST]}


def user_rows(states: list[list]) -> dict[str, np.ndarray]:
    """:func:`user_row` of many users at once, as columns (the feature job's flush: same values)."""
    tc, tn, cc = (np.array([s[i] for s in states], dtype=np.float64).reshape(len(states), -1) for i in (U_TC, U_TN, U_CC))

    def shares(m: np.ndarray) -> np.ndarray:
        return m / np.maximum(m.sum(1), 1)[:, None]

    return {"topic_clicks": shares(tc), "topic_negative": shares(tn), "ctype_clicks": shares(cc),
            "clicks": np.array([s[U_CLK] for s in states], dtype=np.int64),
            "negatives": np.array([s[U_NEG] for s in states], dtype=np.int64),
            "clicks_1h": np.array([window(s[U_BUCKETS], s[U_LAST], 60) for s in states], dtype=np.int64),
            "last_engagement_ms": np.array([s[U_LAST] for s in states], dtype=np.int64)}


def session_rows(states: list[list]) -> dict[str, Any]:
    """The user_session view's values of many users, as columns (post ids newest last)."""
    def col(i: int) -> np.ndarray:
        return np.array([s[i] if len(s) > i else 0 for s in states], dtype=np.int64)

    return {"viewed_posts": [list(s[U_VIEWED]) if len(s) > U_VIEWED else [] for s in states],
            "liked_posts": [list(s[U_LIKED]) if len(s) > U_LIKED else [] for s in states],
            "session_start_ms": col(U_SSTART), "last_view_ms": col(U_LASTVIEW), "session_depth": col(U_DEPTH)}


def user_dense_many(states: list[list]) -> np.ndarray:
    """:func:`user_dense` of many users at once ([n, USER_DENSE_DIM])."""
    from features.offline import UserState

    tc, tn, cc = (np.array([s[i] for s in states], dtype=np.float32).reshape(len(states), -1) for i in (U_TC, U_TN, U_CC))
    return UserState.from_counts(tc, tn, cc, np.array([s[U_CLK] for s in states])).dense()


def user_dense(s: list) -> np.ndarray:
    """The user tower's dense input, exactly as :meth:`features.offline.UserState.dense` builds it offline."""
    return user_dense_many([s])[0]


# ----------------------------------------------------------------------------- topics

# topic state: [clicks_total, first_ts, last_ts, buckets]
T_CLK, T_FIRST, T_LAST, T_BUCKETS = range(4)


def new_topic_state() -> list:
    return [0, 0, 0, {}]


def topic_update(s: list, ts: int, n: int = 1) -> None:
    s[T_CLK] += n
    s[T_FIRST] = ts if s[T_FIRST] == 0 else min(s[T_FIRST], ts)
    s[T_LAST] = max(s[T_LAST], ts)
    bump(s[T_BUCKETS], ts, n)


def topic_row(s: list, now_ms: int | None = None) -> list[float]:
    """TOPIC_STATS_FLOAT: clicks_5m, clicks_1h, long-run clicks per hour, trend (log lift)."""
    now = s[T_LAST] if now_ms is None else now_ms
    c5, c1h = window(s[T_BUCKETS], now, 5), window(s[T_BUCKETS], now, 60)
    hours = max((now - s[T_FIRST]) / HOUR_MS, 1.0)
    longrun = s[T_CLK] / hours
    return [float(c5), float(c1h), float(longrun), float(topic_trend(c1h, longrun))]
