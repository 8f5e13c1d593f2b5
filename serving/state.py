"""A serving replica's state: in-memory features and models, and the per-user Redis state.

Read path per request (one Redis round trip): the fan-out candidate cache, the seen set,
negative feedback, author affinity and the user's Feast rows (``user_topic``,
``user_embedding``). Everything about candidates is in memory (:mod:`serving.catalog`,
:class:`features.change_streams.PostStatsCache`). Redis failures never fail a request: a
circuit breaker skips Redis for ``REDIS_RETRY_S`` after an error, the last good user
features are reused, and the request is flagged degraded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.config import Config
from core.schema import N_TOPICS
from core.units import HOUR_MS, MINUTE_MS
from features.feast_repo import BATCH_FEATURES_KEY
from features.vectors import PRIOR_CTR
from serving.catalog import (ChangeFollower, FollowGraph, PostCatalog, follow_change, load_bootstrap, post_change,
                             record_follow, record_post)
from serving.components import UserContext

log = logging.getLogger("feedrank.serving")

REDIS_RETRY_S = 1.0
SEEN_CAP = 3000
SEEN_TTL_S = 3 * 86_400
USER_TTL_S = 30 * 86_400
EMPTY_CACHE = -1  # sentinel member of a rebuilt-but-empty candidate cache (not a miss)
POST_ID_SEQ = "feedrank:post_id_seq"
ADS_KEY = "feedrank:ads:inventory"
SERVING_CLOCK = "feedrank:serving:clock"  # the simulated clock's origin (wall0_ms, sim0_ms, world_end_ms)

# Fan-out-on-write: add to a follower's cache only if it exists (a missing cache is rebuilt
# from the authors' timelines on the next read, which includes this post), then cap it.
FANOUT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[3]) + 1))
  return 1
end
return 0
"""

ACTED_CAP = 10_000  # (action, post) pairs remembered per user for the signal check

# The signal check, atomic per user: a signal counts when its post was served to the user within the window
# (the seen set) and that action on that post has not counted yet (the acted set); returns per signal
# 0 = counts, 1 = not served, 2 = repeated. ARGV: now, window start, cap, ttl (s), require served (1/0), then
# "action:post" pairs.
SIGNAL_CHECK_LUA = """
local out = {}
for i = 6, #ARGV do
  local post = string.match(ARGV[i], ':(%d+)$')
  local served = ARGV[5] == '0' or redis.call('ZSCORE', KEYS[1], post)
  if (not served) or (served ~= true and tonumber(served) < tonumber(ARGV[2])) then
    out[#out + 1] = 1
  elseif redis.call('ZADD', KEYS[2], 'NX', ARGV[1], ARGV[i]) == 0 then
    out[#out + 1] = 2
  else
    out[#out + 1] = 0
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[3]) + 1))
redis.call('EXPIRE', KEYS[2], ARGV[4])
return out
"""


def _acted_members(signals: list[tuple[str, int]]) -> list[str]:
    return [f"{a}:{p}" for a, p in signals]


def cc_key(u: int) -> str:
    return f"feedrank:cc:{u}"


def seen_key(u: int) -> str:
    return f"feedrank:seen:{u}"


def acted_key(u: int) -> str:
    return f"feedrank:acted:{u}"


def neg_key(u: int) -> str:
    return f"feedrank:neg:{u}"


def aff_key(u: int) -> str:
    return f"feedrank:aff:{u}"


class RedisUnavailable(RuntimeError):
    pass


class RedisGuard:
    """Short timeouts and a circuit breaker: an outage costs one failed call per second, not one per request."""

    def __init__(self, uri: str, timeout_s: float = 0.25):
        import redis

        self.client = redis.Redis.from_url(uri, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           health_check_interval=0)
        self.down_until = 0.0
        self.failures = 0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    def run(self, fn: Callable[[Any], Any]) -> Any:
        import redis

        if not self.available:
            raise RedisUnavailable("redis circuit open")
        try:
            out = fn(self.client)
        except redis.exceptions.ResponseError as e:
            if "OOM" not in str(e):
                raise
            # at maxmemory Redis refuses writes but still answers reads: this write fails, the circuit stays closed
            self.failures += 1
            raise RedisUnavailable(f"redis is at maxmemory, write refused: {e}") from e
        except Exception as e:  # noqa: BLE001 - any other Redis error opens the breaker
            self.failures += 1
            self.down_until = time.monotonic() + REDIS_RETRY_S
            raise RedisUnavailable(str(e)) from e
        return out


def _entry_ts(value: bytes) -> int:
    """When a feedback entry ("<kind or weight>:<ms>") was written; 0 for one without a time."""
    try:
        return int(value.rpartition(b":")[2])
    except ValueError:
        return 0


def _ids(values: list[bytes]) -> np.ndarray:
    return np.array(sorted(int(v) for v in values), dtype=np.int64)


class ServingState:
    """Shared by every request of one replica; models and indexes are swapped atomically by :mod:`serving.model_loader`."""

    def __init__(self, cfg: Config, clock: Callable[[], int] | None = None, bootstrap_dir: str | Path | None = None):
        from features.change_streams import PostStatsCache
        from features.online_store import OnlineStoreReader
        from features.eventlog import open_configured_event_log
        from features.feast_repo import apply
        from features.snapshots import SnapshotStore

        self.cfg = cfg
        self.clock = clock or (lambda: int(time.time() * 1000))
        self.redis = RedisGuard(cfg.redis.uri)
        self.catalog = PostCatalog()
        self.graph = FollowGraph()
        self.boot = load_bootstrap(self.catalog, self.graph, bootstrap_dir) if bootstrap_dir else {}
        store = apply(cfg)
        self.feast = OnlineStoreReader(cfg, store)
        self.stats = PostStatsCache(cfg)
        self._load_stats_export()
        self.author_ctr = self._author_ctr()
        self.batch_version: bytes | None = None
        self.topic_trend = np.zeros(N_TOPICS, dtype=np.float32)
        self.events = open_configured_event_log(cfg)
        self.snapshots = SnapshotStore(cfg)
        from serving.served import ServedRecords

        self.served = ServedRecords(cfg)
        from features.connection import redis_client

        # blocking reads: own connection. From the start of the retained streams: changes made before this
        # replica started (after the bootstrap export) are replayed; applying one twice is a no-op.
        self.changes = ChangeFollower(redis_client(cfg), self.catalog, self.graph, start="0-0")
        self.user_cache: OrderedDict[int, dict[str, Any]] = OrderedDict()  # last good Feast rows per user
        self.ads: dict[int, float] = {}
        self.trending = np.zeros(0, dtype=np.int64)
        self._recent = np.zeros(0, dtype=np.int64)
        self._recent_at: int | None = None
        self._recent_n = 0
        self.models: Any = None  # serving.model_loader.Models, set by the loader
        self.loader: Any = None  # serving.model_loader.ModelLoader
        self.fanout = self.redis.client.register_script(FANOUT_LUA)
        self.signal_check = self.redis.client.register_script(SIGNAL_CHECK_LUA)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ bootstrap
    def _load_stats_export(self) -> None:
        """Post stats as of the batch export (what `feast materialize` loaded); the change stream brings the rest."""
        import pandas as pd

        from core.schema import POST_STATS_FLOAT, POST_STATS_INT

        path = self.cfg.data_dir / "feast" / "post_stats.parquet"
        if not path.exists():
            return
        df = pd.read_parquet(path)
        missing = [c for c in (*POST_STATS_INT, *POST_STATS_FLOAT) if c not in df.columns]
        if missing:
            raise RuntimeError(f"{path} lacks {missing} (written by an older feedrank): run `feedrank feast export`")
        ids = df["post_id"].to_numpy(dtype=np.int64)
        self.stats.apply({b"ids": ids.tobytes(),
                          b"ints": df[list(POST_STATS_INT)].to_numpy(dtype=np.int64).tobytes(),
                          b"floats": df[list(POST_STATS_FLOAT)].to_numpy(dtype=np.float32).tobytes(),
                          b"pushed_ms": b"0"})

    def _author_ctr(self) -> np.ndarray:
        import pandas as pd

        path = self.cfg.data_dir / "feast" / "author_stats.parquet"
        if not path.exists():
            return np.zeros(0, dtype=np.float32)
        df = pd.read_parquet(path, columns=["author_id", "ctr"])
        out = np.full(int(df.author_id.max()) + 1, PRIOR_CTR, dtype=np.float32)
        out[df.author_id.to_numpy()] = df.ctr.to_numpy()
        return out

    def start(self, refresh_s: float = 1.0) -> "ServingState":
        """Background followers: post stats, posts/follows changes, trending, topic trend, ads."""
        self.stats.start()
        self.changes.start()
        t = threading.Thread(target=self._refresh_loop, args=(refresh_s,), name="serving-refresh", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.stats.stop()
        self.changes.stop()
        for t in self._threads:
            t.join(timeout=2)
        try:
            self.events.close()
        except Exception:  # noqa: BLE001
            log.exception("closing the event log")

    def _refresh_loop(self, every_s: float) -> None:
        last_error = ""
        while not self._stop.is_set():
            try:
                self.refresh()
                self.refresh_batch_features()
                last_error = ""
            except Exception as e:  # noqa: BLE001 - keep serving on last good values; say so once per cause
                if str(e) != last_error:
                    log.warning("refresh failed (serving on the last good trending, topic trend, ads and author CTR): %s", e)
                last_error = str(e)
            self._stop.wait(every_s)

    def refresh_batch_features(self) -> bool:
        """When a batch run (`feedrank batch run features`) has materialised new author stats into the online
        store, reload every author's CTR from it (in chunks, on this background thread); True if reloaded."""
        version = self.redis.run(lambda r: r.get(BATCH_FEATURES_KEY))
        if version is None or version == self.batch_version or "author_stats" not in self.feast.views:
            return False
        n = int(self.catalog.author[: self.catalog.n].max()) + 1 if self.catalog.n else 0
        ctr = np.full(max(n, self.author_ctr.size), PRIOR_CTR, dtype=np.float32)
        ctr[: self.author_ctr.size] = self.author_ctr
        found = 0
        for lo in range(0, n, 10_000):
            ids = list(range(lo, min(n, lo + 10_000)))
            rows = self.redis.run(lambda r: self.feast.read(r, "author_stats", ids))
            for a, row in zip(ids, rows):
                if row and row.get("ctr") is not None:
                    ctr[a] = row["ctr"]
                    found += 1
        self.author_ctr = ctr
        self.batch_version = version
        log.info("author CTR of %d authors reloaded from the online store (batch run %s)", found, version.decode())
        return True

    def refresh(self) -> None:
        """Trending list, topic trend and the ad inventory (cheap, once a second)."""
        from core.schema import POST_STATS_FLOAT, POST_STATS_INT

        now = self.clock()
        window = int(self.cfg.candidates.trending_window_h * HOUR_MS)
        n = min(self.catalog.n, self.stats.floats.shape[0])
        if n and (self._recent_at is None or now - self._recent_at > MINUTE_MS or n != self._recent_n):
            # the posts inside the trending window, recomputed once a minute (a full scan of 1M posts
            # every second would steal ~10 ms of interpreter time from requests)
            self._recent = np.flatnonzero(self.catalog.published_ms[:n] > now - window - MINUTE_MS)
            self._recent_at, self._recent_n = now, n
        ids = self._recent
        if ids.size:
            pub = self.catalog.published_ms[ids]
            with self.stats.lock:
                score = (self.stats.floats[ids, POST_STATS_FLOAT.index("trending_score")]
                         + 0.01 * np.log1p(self.stats.ints[ids, POST_STATS_INT.index("clicks_1h")]))  # ties: more clicks in the last hour
            score = np.where((pub > now - window) & (pub <= now), score, -np.inf)
            k = min(self.cfg.candidates.trending_k, int(np.isfinite(score).sum()))
            if k > 0:
                top = np.argpartition(-score, k - 1)[:k]
                self.trending = ids[top[np.argsort(-score[top])]].astype(np.int64)
        rows = self.redis.run(lambda r: self.feast.read(r, "topic_stats", list(range(self.topic_trend.size))))
        self.topic_trend = np.array([(row or {}).get("trend") or 0.0 for row in rows], dtype=np.float32)
        raw = self.redis.run(lambda r: r.hgetall(ADS_KEY))
        self.ads = {int(k): float(v) for k, v in raw.items()}

    # ------------------------------------------------------------------ per-request reads
    def user_context(self, user_id: int, degrade: Callable[[str], None], need_cache: bool = True) -> UserContext:
        ctx = UserContext(user_id=user_id, following=np.array(self.graph.following(user_id), dtype=np.int64))
        cap = self.cfg.candidates.cache_size

        def read(r: Any) -> list[Any]:
            with r.pipeline(transaction=False) as p:
                if need_cache:
                    p.zrevrange(cc_key(user_id), 0, cap - 1)
                p.zrange(seen_key(user_id), 0, -1)
                p.hgetall(neg_key(user_id))
                p.hgetall(aff_key(user_id))
                self.feast.queue(p, "user_topic", user_id)
                self.feast.queue(p, "user_embedding", user_id)
                self.feast.queue(p, "user_session", user_id)
                return p.execute()

        try:
            raw = self.redis.run(read)
        except RedisUnavailable:
            degrade("redis_unavailable")
            feast = self.user_cache.get(user_id)
            if feast is None:
                degrade("user_features_missing")
            else:
                self._apply_feast(ctx, feast["user_topic"], feast["user_embedding"], feast["user_session"])
            return ctx
        if need_cache:
            cc = raw.pop(0)
            ctx.cached_candidates = np.array([int(x) for x in cc], dtype=np.int64) if cc else None
        seen, neg, aff, ut, ue, us = raw
        ctx.seen = _ids(seen)
        hidden, blocked, unfollowed = [], [], []
        now = self.clock()
        since = now - int(self.cfg.candidates.unfollow_exclusion_h * HOUR_MS)
        for k, v in neg.items():
            k = k.decode()
            kind, _, ident = k.partition(":")
            if kind == "p":
                hidden.append(int(ident))
            elif kind == "a":
                blocked.append(int(ident))
            elif kind == "u" and _entry_ts(v) >= since:
                unfollowed.append(int(ident))
            elif kind in ("fa", "ft"):
                decayed = self._fatigue_now(v, now)
                (ctx.fatigue_authors if kind == "fa" else ctx.fatigue_topics)[int(ident)] = min(decayed, 1.0)
        ctx.hidden_posts, ctx.blocked_authors = np.array(sorted(hidden), dtype=np.int64), np.array(sorted(blocked), dtype=np.int64)
        ctx.unfollowed_authors = np.array(sorted(unfollowed), dtype=np.int64)
        ctx.affinity = {int(k): int(v) for k, v in aff.items()}
        ut_row, ue_row = self.feast.decode("user_topic", ut), self.feast.decode("user_embedding", ue)
        us_row = self.feast.decode("user_session", us)
        self.user_cache[user_id] = {"user_topic": ut_row, "user_embedding": ue_row, "user_session": us_row}
        self.user_cache.move_to_end(user_id)
        while len(self.user_cache) > 100_000:
            self.user_cache.popitem(last=False)
        self._apply_feast(ctx, ut_row, ue_row, us_row)
        return ctx

    def _apply_feast(self, ctx: UserContext, ut: dict | None, ue: dict | None, us: dict | None) -> None:
        if us:
            ctx.viewed_posts = np.asarray(us.get("viewed_posts") or [], dtype=np.int64)
            ctx.liked_posts = np.asarray(us.get("liked_posts") or [], dtype=np.int64)
            ctx.session_start_ms, ctx.last_view_ms = int(us.get("session_start_ms") or 0), int(us.get("last_view_ms") or 0)
            ctx.session_depth = int(us.get("session_depth") or 0)
        if ut:
            for name in ("topic_clicks", "topic_negative", "ctype_clicks"):
                if ut.get(name):
                    setattr(ctx, name, np.asarray(ut[name], dtype=np.float32))
            ctx.clicks, ctx.negatives = int(ut.get("clicks") or 0), int(ut.get("negatives") or 0)
        if ue and ue.get("embedding"):
            ctx.embedding = np.asarray(ue["embedding"], dtype=np.float32)
            ctx.embedding_source = "feast"
        elif self.models is not None and self.models.towers is not None:
            ctx.embedding = self.models.user_embedding(ctx)
            ctx.embedding_source = "tower"

    # ------------------------------------------------------------------ fan-out cache
    def celebrity(self, author: int) -> bool:
        return self.graph.follower_count(author) > self.cfg.candidates.celebrity_followers

    def rebuild_cache(self, user: UserContext, now_ms: int) -> np.ndarray:
        """Fan-out-on-read for a cache miss: recent posts of followed non-celebrity authors."""
        c = self.cfg.candidates
        authors = [a for a in user.following.tolist() if not self.celebrity(a)]
        pids = self.catalog.recent_by_authors(authors, now_ms - int(c.follow_window_h * HOUR_MS), now_ms)
        if pids.size > c.cache_size:
            pids = pids[np.argsort(-self.catalog.published_ms[pids], kind="stable")[: c.cache_size]]
        ts = self.catalog.published_ms[pids]

        def write(r: Any) -> None:
            with r.pipeline(transaction=False) as p:
                key = cc_key(user.user_id)
                p.delete(key)
                p.zadd(key, {str(int(x)): int(t) for x, t in zip(pids, ts)} if pids.size else {str(EMPTY_CACHE): 0})
                p.expire(key, c.cache_ttl_s)
                p.execute()

        try:
            self.redis.run(write)
        except RedisUnavailable:
            pass
        return pids

    def fan_out(self, post_id: int, author: int, published_ms: int) -> tuple[int, bool]:
        """Write a new post into its author's followers' caches; (caches written, lazy)."""
        if self.celebrity(author):
            return 0, True
        followers = self.graph.followers(author)
        cap = self.cfg.candidates.cache_size

        def write(r: Any) -> int:
            with r.pipeline(transaction=False) as p:
                for f in followers:
                    self.fanout(keys=[cc_key(f)], args=[str(post_id), published_ms, cap], client=p)
                return int(sum(p.execute()))

        return (self.redis.run(write) if followers else 0), False

    # ------------------------------------------------------------------ writes
    def publish(self, post_id: int, author: int, topic: int, ctype: int, original: bool, flagged: bool,
                published_ms: int) -> tuple[int, bool]:
        """Announce a new post to every replica (raises RedisUnavailable before anything changed), add it
        here, and fan it out; a failed fan-out is repaired by the cache rebuild on the next miss."""
        change = post_change(post_id, author, topic, ctype, original, flagged, published_ms)
        self._record(record_post, change)
        self.catalog.add(post_id, author, topic, ctype, original, flagged, published_ms)
        try:
            return self.fan_out(post_id, author, published_ms)
        except RedisUnavailable as e:
            log.warning("fan-out of post %s failed (%s); followers' caches rebuild on their next miss", post_id, e)
            return 0, self.celebrity(author)

    def _record(self, record: Callable[[Any, dict[str, Any], int], None], change: dict[str, Any]) -> None:
        def write(r: Any) -> None:
            with r.pipeline(transaction=True) as p:  # the stream entry and the record, both or neither
                record(p, change, self.cfg.streaming.change_stream_maxlen)
                p.execute()

        self.redis.run(write)

    def next_post_id(self) -> int:
        floor = self.catalog.n
        nid = int(self.redis.run(lambda c: c.incr(POST_ID_SEQ)))
        if nid < floor:  # first use after a bootstrap: jump past every known id
            nid = int(self.redis.run(lambda c: c.incrby(POST_ID_SEQ, floor - nid)))
        return nid

    def user_id_bound(self) -> int:
        """One past the largest user id this replica knows (follow graph, post authors)."""
        return max(self.graph.n_nodes, self.catalog.max_author + 1)

    def follow(self, user: int, author: int, follow: bool) -> bool:
        """Announce the change to every replica first, then apply it here: a Redis failure
        (RedisUnavailable) leaves this replica's graph as it was, so a retry changes it."""
        if self.graph.follows(user, author) == follow:
            return False
        self._record(record_follow, follow_change(user, author, follow))
        self.graph.apply(user, author, follow)  # this replica's change follower may have applied it already

        # follow: the new author's recent posts belong in the cache; unfollow: the old author's do not, and the
        # author is not recommended out of network either (candidates.unfollow_exclusion_h) until followed again
        def write(r: Any) -> None:
            with r.pipeline(transaction=False) as p:
                p.delete(cc_key(user))
                if follow:
                    p.hdel(neg_key(user), f"u:{author}")
                else:
                    p.hset(neg_key(user), f"u:{author}", f"unfollow:{self.clock()}")
                    p.expire(neg_key(user), USER_TTL_S)
                p.execute()

        try:
            self.redis.run(write)
        except RedisUnavailable as e:
            log.warning("candidate cache / unfollow record of user %s not updated after a follow change (%s)", user, e)
        return True

    def _fatigue_now(self, entry: bytes, now_ms: int) -> float:
        """A fatigue entry ("<weight>:<ts>") decayed to ``now_ms``: halves every rerank.fatigue_half_life_hours."""
        w, _, ts = entry.decode().partition(":")
        return float(w) * 0.5 ** (max(now_ms - int(ts), 0) / (self.cfg.rerank.fatigue_half_life_hours * HOUR_MS))

    def check_signals(self, user: int, signals: list[tuple[str, int]], now_ms: int,
                      require_served: bool = True) -> list[str | None]:
        """Per (action, post) signal: None when it counts, else why not ("not_served": no exposure of
        the post to this user within serving.signal_window_s, checked unless ``require_served`` is
        False; "repeated": that action on that post counted already). Raises RedisUnavailable when
        the check cannot run."""
        window_ms = self.cfg.serving.signal_window_s * 1000
        args = [now_ms, now_ms - window_ms, ACTED_CAP, self.cfg.serving.signal_window_s, int(require_served),
                *_acted_members(signals)]
        codes = self.redis.run(lambda r: self.signal_check(keys=[seen_key(user), acted_key(user)], args=args, client=r))
        return [(None, "not_served", "repeated")[int(c)] for c in codes]

    def release_signals(self, user: int, signals: list[tuple[str, int]]) -> None:
        """Forget that these signals counted: their append failed and the client was told to retry,
        so the retry must count, not be dropped as "repeated". Raises RedisUnavailable."""
        if signals:
            self.redis.run(lambda r: r.zrem(acted_key(user), *_acted_members(signals)))

    def record_seen(self, user: int, post_ids: list[int], now_ms: int) -> None:
        def write(r: Any) -> None:
            with r.pipeline(transaction=False) as p:
                p.zadd(seen_key(user), {str(x): now_ms for x in post_ids})
                p.zremrangebyrank(seen_key(user), 0, -(SEEN_CAP + 1))
                p.expire(seen_key(user), SEEN_TTL_S)
                p.execute()

        self.redis.run(write)

    def record_affinity(self, user: int, authors: list[int]) -> None:
        def write(r: Any) -> None:
            with r.pipeline(transaction=False) as p:
                for a in authors:
                    p.hincrby(aff_key(user), str(a), 1)
                p.expire(aff_key(user), USER_TTL_S)
                p.execute()

        if authors:
            self.redis.run(write)

    def record_feedback(self, user: int, kind: str, target: str, post: int | None, author: int | None,
                        topic: int | None, now_ms: int) -> None:
        """hide: never again (post, or author = block); not_interested / see_less: remove the post and
        add decaying fatigue on its author and topic (strength 1.0 / 0.5)."""
        strength = {"hide": 1.0, "not_interested": 1.0, "see_less": 0.5}[kind]
        fields: dict[str, str] = {}
        fatigue: list[tuple[str, float]] = []
        if target == "post" and post is not None:
            fields[f"p:{post}"] = f"{kind}:{now_ms}"
            if kind != "hide":
                if author is not None:
                    fatigue.append((f"fa:{author}", strength * 0.5))
                if topic is not None:
                    fatigue.append((f"ft:{topic}", strength * 0.5))
        elif target == "author" and author is not None:
            if kind == "hide":
                fields[f"a:{author}"] = f"{kind}:{now_ms}"
            else:
                fatigue.append((f"fa:{author}", strength))
        elif target == "topic" and topic is not None:
            fatigue.append((f"ft:{topic}", strength))

        def write(r: Any) -> None:
            old = r.hmget(neg_key(user), [k for k, _ in fatigue]) if fatigue else []
            for (k, w), prev in zip(fatigue, old):
                if prev:
                    w += self._fatigue_now(prev, now_ms)
                fields[k] = f"{min(w, 1.0):.4f}:{now_ms}"
            with r.pipeline(transaction=False) as p:
                if fields:
                    p.hset(neg_key(user), mapping=fields)
                p.expire(neg_key(user), USER_TTL_S)
                p.hlen(neg_key(user))
                n = p.execute()[-1]
            cap = self.cfg.serving.max_feedback_entries
            if n > cap:  # every request reads the whole hash: keep the newest entries only
                entries = r.hgetall(neg_key(user))
                oldest = sorted(entries, key=lambda k: _entry_ts(entries[k]))[: n - cap]
                r.hdel(neg_key(user), *oldest)

        self.redis.run(write)
