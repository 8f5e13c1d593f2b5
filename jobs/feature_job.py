"""Real-time feature job (PyFlink DataStream, thread mode): event log -> Feast online store.

    event lines ─ ParseMap
      ─ key_by(post) PostFeaturesFunction   de-duplication, post_stats, new-post embeddings + index delta
      ─ event-time watermarks (engagements and follows only)
      ─ key_by(user) UserFeaturesFunction   user_topic, user_embedding (user tower)
      ─ key_by(topic) TopicFeaturesFunction topic_stats

* Validation: every line goes through :func:`features.events.parse_event`; malformed
  lines are counted and logged with their reason, never passed on.
* De-duplication by event_id inside the post operator: every copy of an event has the
  same post (follows: the same user), so a per-key MapState of recent ids is enough and
  saves a whole operator hop per event (measured ~27 us). Ids expire through
  processing-time timers after ``streaming.dedupe_retention_s`` (StateTtlConfig fails in
  thread mode on a cluster).
* Event time: 5-minute / 1-hour windows are per-minute buckets of event time. Watermarks
  (bounded out-of-orderness) are assigned after the post operator, on the engagement
  stream only: a Python timestamp assigner costs ~36 us per event, and exposures, which
  dominate the log, need none. The post operator re-pushes decayed velocities from
  processing-time timers, evaluated at the event time it has reached.
* Writes: each operator keeps the latest row per changed key and pushes them to Feast
  in one batch every ``streaming.flush_ms`` (or ``max_buffer_rows``); post stats also go
  to a Redis change stream for serving's in-memory cache.
* Exactly-once features: state is checkpointed with the source position and every push
  writes absolute values computed from state, so a restart replays events onto the
  restored state and writes the same values again — nothing is counted twice.

Run embedded: ``feedrank jobs run features``; on the cluster:
``flink run -py jobs/feature_job.py -pyexec .venv/bin/python -- --feedrank-config cfg.json``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from feedrank.config import Config

log = logging.getLogger("feedrank.jobs.features")
JOB = "features"


class Catalog:
    """What is known of posts and follows published before the stream starts (bootstrap)."""

    def __init__(self, cfg: Config):
        self.post_meta: np.ndarray | None = None  # [n, 4]: author, topic, ctype, published_ms
        self.follow_src = self.follow_dst = np.zeros(0, dtype=np.int64)
        world_dir = cfg.streaming.bootstrap_world
        if world_dir:
            from sim.world import World

            w = World.load(cfg.path(world_dir))
            self.post_meta = np.stack([w.post_author, w.post_topic, w.post_ctype, w.post_ts], axis=1).astype(np.int64)
            order = np.argsort(w.follow_src, kind="stable")
            self.follow_src, self.follow_dst = w.follow_src[order], w.follow_dst[order]
        else:
            pq = cfg.data_dir / "feast" / "post_content.parquet"
            if pq.exists():
                import pandas as pd

                df = pd.read_parquet(pq, columns=["post_id", "author_id", "topic", "content_type", "published_ms"])
                meta = np.full((int(df.post_id.max()) + 1, 4), -1, dtype=np.int64)
                meta[df.post_id.to_numpy()] = df[["author_id", "topic", "content_type", "published_ms"]].to_numpy()
                self.post_meta = meta

    def post(self, post_id: int) -> tuple[int, int, int, int] | None:
        if self.post_meta is None or not 0 <= post_id < self.post_meta.shape[0] or self.post_meta[post_id, 1] < 0:
            return None
        a, t, c, ts = self.post_meta[post_id].tolist()
        return a, t, c, ts

    def follows(self, user_id: int) -> list[int]:
        lo, hi = np.searchsorted(self.follow_src, [user_id, user_id + 1])
        return self.follow_dst[lo:hi][-200:].tolist()


def _functions(cfg: Config, fail_once_on: str | None = None) -> dict[str, Any]:
    """The job's functions (pyflink and torch are imported lazily, inside the workers)."""
    from pyflink.common import Types
    from pyflink.common.watermark_strategy import TimestampAssigner
    from pyflink.datastream import KeyedProcessFunction, MapFunction, TimeDomain
    from pyflink.datastream.state import MapStateDescriptor, ValueStateDescriptor

    from features import realtime as rt
    from features.feast_repo import POST_STATS_INT

    S = cfg.streaming
    long_dwell_ms = cfg.heads.long_dwell_ms

    class ParseMap(MapFunction):
        """JSON line -> compact tuple; a malformed line becomes (-1, reason) and is logged."""

        def open(self, ctx: Any) -> None:
            self.invalid = 0

        def map(self, line: str) -> tuple:
            out = rt.compact(line)
            if isinstance(out, str):
                self.invalid += 1
                if self.invalid <= 20 or self.invalid % 1000 == 0:
                    log.warning("invalid event #%d: %s", self.invalid, out)
                return (-1, out)
            return out

    class EventTime(TimestampAssigner):
        def extract_timestamp(self, value: tuple, record_timestamp: int) -> int:
            return value[rt.K_TS] if value[0] >= 0 else 0

    class Buffered(KeyedProcessFunction):
        """Keeps the latest row per changed key; pushes them as one batch per flush interval."""

        view = ""

        def open(self, ctx: Any) -> None:
            from features.client import FeatureWriter
            from jobs import startup_stacks

            startup_stacks.begin(cfg, f"{self.view} operator")
            self.writer = FeatureWriter(cfg)
            self.dirty: dict[int, Any] = {}
            self.last_flush = time.monotonic()
            self.flush_timer: int | None = None
            self.events = 0
            self.max_ts = 0

        def warm_up(self) -> None:
            """The bootstrap catalog and the towers load on the first element, not in ``open``: the job's
            operators open concurrently, and a short ``open`` keeps start-up quick and its stack dump
            (jobs/startup_stacks.py) about start-up alone."""
            self.catalog = Catalog(cfg)
            self.embedder.get()

        def mark_opened(self) -> None:
            """``<view>_opened`` counts completed opens: restarts are visible, and `feedrank jobs run` restarts
            a job whose operators never finish opening (a PyFlink thread-mode start-up hang, seen intermittently)."""
            from features.client import PROGRESS_KEY
            from jobs import startup_stacks

            self.writer.redis.hincrby(PROGRESS_KEY.format(job=JOB), f"{self.view}_opened", 1)
            startup_stacks.end(f"{self.view} operator")

        def after_update(self, ctx: Any) -> None:
            if len(self.dirty) >= S.max_buffer_rows or (self.dirty and time.monotonic() - self.last_flush >= S.flush_ms / 1000):
                self.flush()
            if self.dirty and self.flush_timer is None:
                due = _tagged(ctx.timer_service().current_processing_time() + S.flush_ms, 0)
                ctx.timer_service().register_processing_time_timer(due)
                self.flush_timer = due

        def on_timer(self, timestamp: int, ctx: Any):
            if ctx.time_domain() == TimeDomain.PROCESSING_TIME and timestamp % 10 == 0:
                self.flush_timer = None
                self.flush()
            else:
                self.on_other_timer(timestamp, ctx)
                self.after_update(ctx)
            return iter(())

        def on_other_timer(self, timestamp: int, ctx: Any) -> None:
            """Event-time timers, and processing-time timers tagged by ``timestamp % 10`` (flush = 0)."""

        def flush(self) -> None:
            self.last_flush = time.monotonic()
            if self.dirty:
                rows, self.dirty = self.dirty, {}
                self.write(rows)
            self.writer.progress(JOB, {f"{self.view}_events": self.events, f"{self.view}_max_ts": self.max_ts,
                                       f"{self.view}_pushed_rows": self.writer.pushed_rows,
                                       f"{self.view}_push_seconds": round(self.writer.push_seconds, 3),
                                       f"{self.view}_flushed_at_ms": int(time.time() * 1000)})

        def write(self, rows: dict[int, Any]) -> None:
            """Each subclass writes its view's rows (``{key: (state, as-of time)}``)."""

    class PostFeaturesFunction(Buffered):
        """Keyed by post (follows: by user): drops repeated event_ids and invalid lines, keeps
        engagement statistics, enriches engagements with the post's author/topic/content type
        for the user and topic operators, and embeds newly published posts for retrieval."""

        view = "post"

        def open(self, ctx: Any) -> None:
            super().open(ctx)
            self.state = ctx.get_state(ValueStateDescriptor("post", Types.PICKLED_BYTE_ARRAY()))
            self.seen = ctx.get_map_state(MapStateDescriptor("seen", Types.STRING(), Types.LONG()))
            self.catalog: Catalog | None = None  # loaded with the towers on the first element (see warm_up)
            self.new_posts: list[tuple] = []
            self.embedder = PostEmbedder(cfg)
            self.fault = fail_once_on
            self.fault_marker = cfg.data_dir / "flink" / f"fault-{fail_once_on}.done"
            self.counts = {"events": 0, "duplicates": 0, "invalid": 0}
            self.retention_ms = int(S.dedupe_retention_s * 1000)
            self.expiry_due: dict[int, int] = {}
            self.mark_opened()

        def process_element(self, e: tuple, ctx: Any):
            if self.catalog is None:
                self.warm_up()
            self.events += 1
            self.counts["events"] += 1
            if e[0] < 0:
                self.counts["invalid"] += 1
                return
            eid = e[rt.K_ID]
            if self.seen.contains(eid):
                self.counts["duplicates"] += 1
                return
            now = int(time.time() * 1000)  # Flink's processing time is the wall clock: no call into the JVM
            self.seen.put(eid, now)
            # one id-expiry timer per key and minute: registering it again is a no-op in Flink but still
            # a call into the JVM, so the operator remembers what it registered (a restart forgets: harmless)
            due = _tagged(now + self.retention_ms, 1, 60_000)
            key = e[rt.K_POST] if e[rt.K_KIND] not in (rt.FOLLOW, rt.UNFOLLOW) else -1 - e[rt.K_USER]
            if self.expiry_due.get(key) != due:
                ctx.timer_service().register_processing_time_timer(due)
                self.expiry_due[key] = due
            if self.fault and eid == self.fault and not self.fault_marker.exists():
                self.fault_marker.parent.mkdir(parents=True, exist_ok=True)
                self.fault_marker.touch()
                raise RuntimeError(f"injected failure at event {self.fault} (test of restart from checkpoint)")
            kind = e[rt.K_KIND]
            if kind in (rt.FOLLOW, rt.UNFOLLOW):
                yield e
                return
            ts = e[rt.K_TS]
            self.max_ts = max(self.max_ts, ts)
            pid = e[rt.K_POST]
            s = self.state.value()
            if s is None:
                s = rt.new_post_state(self.catalog.post(pid))
            changed = rt.post_update(s, e, long_dwell_ms)
            self.state.update(s)
            if kind == rt.PUBLISH:
                self.new_posts.append(e)
            if changed:
                self.dirty[pid] = (s, None)
            if kind == rt.ENGAGEMENT and e[rt.K_ACTION] != rt.A["view"]:
                if e[rt.K_ACTION] == rt.A["click"]:  # re-push when the click leaves the 5 min / 1 h windows
                    ctx.timer_service().register_processing_time_timer(_tagged(now + 5 * rt.MINUTE_MS, 2, 10_000))
                    ctx.timer_service().register_processing_time_timer(_tagged(now + 60 * rt.MINUTE_MS, 2, 10_000))
                meta = s[rt.P_META]
                if meta is not None:
                    e = e[:rt.K_AUTHOR] + (meta[0],) + e[rt.K_AUTHOR + 1:rt.K_TOPIC] + (meta[1], meta[2]) + e[rt.K_TEXT:]
                yield e
            self.after_update(ctx)

        def on_other_timer(self, timestamp: int, ctx: Any) -> None:
            if timestamp % 10 == 1:  # forget event ids older than the retention
                key = ctx.get_current_key()
                if self.expiry_due.get(key) == timestamp:
                    del self.expiry_due[key]
                horizon = timestamp - self.retention_ms
                old = [k for k, t in self.seen.items() if t <= horizon]
                for k in old:
                    self.seen.remove(k)
                if not self.seen.is_empty():
                    due = _tagged(timestamp + 60_000, 1, 60_000)
                    ctx.timer_service().register_processing_time_timer(due)
                    self.expiry_due.setdefault(key, due)
            elif timestamp % 10 == 2:  # velocities decay as event time passes
                s = self.state.value()
                if s is not None:
                    self.dirty[ctx.get_current_key()] = (s, max(s[rt.P_LAST], self.max_ts))

        def write(self, rows: dict[int, Any]) -> None:
            ids = np.fromiter(rows.keys(), dtype=np.int64, count=len(rows))
            ints = np.empty((ids.size, len(POST_STATS_INT)), dtype=np.int64)
            floats = np.empty((ids.size, 2), dtype=np.float32)
            for i, (s, now) in enumerate(rows.values()):
                iv, fv = rt.post_row(s, now)
                ints[i] = iv
                floats[i] = fv
            self.writer.push_post_stats(ids, ints, floats)

        def flush(self) -> None:
            if self.new_posts:
                posts, self.new_posts = self.new_posts, []
                self.embedder.publish(self.writer, posts)
            super().flush()
            self.writer.progress(JOB, {f"dedupe_{k}": v for k, v in self.counts.items()})

    class UserFeaturesFunction(Buffered):
        """Keyed by user: topic preferences with negative feedback, recent engagement, follows;
        the user embedding is recomputed by the user tower for every user whose inputs changed."""

        view = "user"

        def open(self, ctx: Any) -> None:
            super().open(ctx)
            self.state = ctx.get_state(ValueStateDescriptor("user", Types.PICKLED_BYTE_ARRAY()))
            self.catalog: Catalog | None = None  # loaded with the towers on the first element (see warm_up)
            self.embedder = UserEmbedder(cfg)
            self.mark_opened()

        def process_element(self, e: tuple, ctx: Any):
            if self.catalog is None:
                self.warm_up()
            self.events += 1
            uid = e[rt.K_USER]
            s = self.state.value()
            if s is None:
                s = rt.new_user_state(self.catalog.follows(uid))
            feats, emb = rt.user_update(s, e)
            self.state.update(s)
            self.max_ts = max(self.max_ts, e[rt.K_TS])
            if feats or emb:
                old = self.dirty.get(uid)
                self.dirty[uid] = (s, feats or (old is not None and old[1]), emb or (old is not None and old[2]))
            if e[rt.K_KIND] == rt.ENGAGEMENT and e[rt.K_ACTION] == rt.A["click"]:
                m = e[rt.K_TS] // rt.MINUTE_MS
                ctx.timer_service().register_event_time_timer((m + 60) * rt.MINUTE_MS)
                if e[rt.K_TOPIC] >= 0:
                    yield e[rt.K_TOPIC], e[rt.K_TS]
            self.after_update(ctx)

        def on_other_timer(self, timestamp: int, ctx: Any) -> None:
            s = self.state.value()
            if s is not None:
                s[rt.U_LAST] = max(s[rt.U_LAST], timestamp)  # clicks_1h as of the watermark
                self.state.update(s)
                self.dirty[ctx.get_current_key()] = (s, True, False)

        def write(self, rows: dict[int, Any]) -> None:
            feat = [(uid, rt.user_row(s)) for uid, (s, f, _) in rows.items() if f]
            if feat:
                cols = {k: [r[k] for _, r in feat] for k in feat[0][1]}
                self.writer.write("user_topic", np.array([u for u, _ in feat], dtype=np.int64), cols)
            emb = [(uid, s) for uid, (s, _, e) in rows.items() if e]
            if emb:
                self.embedder.publish(self.writer, emb)

    class TopicFeaturesFunction(Buffered):
        """Keyed by topic: click velocity over 5 minutes / 1 hour and the trend against the long run."""

        view = "topic"

        def open(self, ctx: Any) -> None:
            super().open(ctx)
            self.state = ctx.get_state(ValueStateDescriptor("topic", Types.PICKLED_BYTE_ARRAY()))
            self.mark_opened()

        def process_element(self, value: tuple, ctx: Any):
            self.events += 1
            topic, ts = value
            s = self.state.value() or rt.new_topic_state()
            rt.topic_update(s, ts)
            self.state.update(s)
            self.max_ts = max(self.max_ts, ts)
            self.dirty[topic] = (s, None)
            m = ts // rt.MINUTE_MS
            ctx.timer_service().register_event_time_timer((m + 5) * rt.MINUTE_MS)
            ctx.timer_service().register_event_time_timer((m + 60) * rt.MINUTE_MS)
            self.after_update(ctx)
            return iter(())

        def on_other_timer(self, timestamp: int, ctx: Any) -> None:
            s = self.state.value()
            if s is not None:
                self.dirty[ctx.get_current_key()] = (s, timestamp)

        def write(self, rows: dict[int, Any]) -> None:
            from features.feast_repo import TOPIC_STATS_FLOAT

            vals = np.array([rt.topic_row(s, now) for s, now in rows.values()], dtype=np.float32)
            self.writer.write("topic_stats", np.fromiter(rows.keys(), dtype=np.int64, count=len(rows)),
                              {n: vals[:, j] for j, n in enumerate(TOPIC_STATS_FLOAT)})

    return {"parse": ParseMap, "event_time": EventTime, "post": PostFeaturesFunction,
            "user": UserFeaturesFunction, "topic": TopicFeaturesFunction}


def _tagged(ts: int, tag: int, granularity: int = 10) -> int:
    """A processing-time timer timestamp rounded up to ``granularity`` ms with ``tag`` in its last
    digit: one key may hold flush (0), id-expiry (1) and velocity-decay (2) timers, and Flink
    merges timers of the same key and timestamp, so rounding also bounds their number."""
    return -(-ts // granularity) * granularity + tag


class _Towers:
    """The current two-tower model from the model store, re-checked every poll interval."""

    def __init__(self, cfg: Config):
        from models.store import ModelStore

        self.store = ModelStore.from_config(cfg)
        self.poll_s = cfg.model_store.poll_interval_s
        self.version: str | None = None
        self.retrieval: str | None = None
        self.model: Any = None
        self.checked = 0.0
        self.warned = False

    def get(self) -> Any:
        if time.monotonic() - self.checked < self.poll_s and self.model is not None:
            return self.model
        self.checked = time.monotonic()
        try:
            v, rv = self.store.current("two_tower"), self.store.current("retrieval")
        except Exception as e:  # noqa: BLE001 - a store outage must not stop features
            log.warning("model store unavailable: %s", e)
            return self.model
        if v is None:
            if not self.warned:
                log.warning("no two_tower model in the store: embeddings are not refreshed")
                self.warned = True
            return None
        if v != self.version:
            from models.inference import load_numpy_towers

            try:
                self.model = load_numpy_towers(self.store, v)  # torch never returns in thread mode: numpy
            except Exception as e:  # noqa: BLE001 - features keep flowing; embeddings wait for a usable model
                log.warning("two_tower %s cannot be used, embeddings are not refreshed: %s", v, e)
                self.version = v
                return self.model
            self.version = v
        self.retrieval = rv
        return self.model


class PostEmbedder(_Towers):
    """New-post path: post tower -> post_embedding (Feast) + index delta (Redis stream)."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        from models.inference import PostArrays

        self.featurize = PostArrays()

    def publish(self, writer: Any, posts: list[tuple]) -> None:
        from features import realtime as rt

        model = self.get()
        if model is None:
            return
        ids = np.array([p[rt.K_POST] for p in posts], dtype=np.int64)
        x = self.featurize.arrays([p[rt.K_TEXT] for p in posts], np.array([p[rt.K_AUTHOR] for p in posts]),
                           np.array([p[rt.K_TOPIC] for p in posts]), np.array([p[rt.K_CTYPE] for p in posts]))
        emb = model.post(x)
        writer.write("post_embedding", ids, {"embedding": emb.tolist()})
        if self.retrieval is not None:
            writer.publish_index_delta(self.retrieval, ids, emb, np.array([p[rt.K_TS] for p in posts], dtype=np.int64))


class UserEmbedder(_Towers):
    """User tower over the user's current topic profile and follows -> user_embedding (Feast)."""

    def publish(self, writer: Any, users: list[tuple[int, list]]) -> None:
        from features import realtime as rt
        from models.inference import author_bucket

        model = self.get()
        if model is None:
            return
        dense = np.stack([rt.user_dense(s) for _, s in users])
        lens = [max(len(s[rt.U_FOLLOWS]), 1) for _, s in users]
        ids = np.concatenate([author_bucket(np.array(s[rt.U_FOLLOWS] or [0], dtype=np.int64)) if s[rt.U_FOLLOWS]
                              else np.zeros(1, dtype=np.int64) for _, s in users])
        offs = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        emb = model.user(dense, ids, offs)
        writer.write("user_embedding", np.array([u for u, _ in users], dtype=np.int64), {"embedding": emb.tolist()})


def restart_configuration(cfg: Config) -> dict[str, str]:
    return {"restart-strategy.type": "fixed-delay",
            "restart-strategy.fixed-delay.attempts": str(cfg.streaming.restart_attempts),
            "restart-strategy.fixed-delay.delay": "1 s",
            "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION"}


def build(env: Any, cfg: Config, fail_once_on: str | None = None) -> Any:
    """The whole pipeline (see the module docstring for its shape)."""
    from pyflink.common import Duration, Types, WatermarkStrategy

    from features import realtime as rt
    from features.feast_repo import apply
    from jobs.sources import event_lines

    apply(cfg)  # registers views and push sources (idempotent), so the job runs on a fresh stack
    f = _functions(cfg, fail_once_on)
    wm = (WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_millis(cfg.streaming.out_of_orderness_ms))
          .with_timestamp_assigner(f["event_time"]()))
    invalid_key = -(1 << 62)

    def post_key(e: tuple) -> int:
        if e[0] < 0:
            return invalid_key
        return e[rt.K_POST] if e[rt.K_KIND] not in (rt.FOLLOW, rt.UNFOLLOW) else -1 - e[rt.K_USER]

    enriched = (event_lines(env, cfg, "events").map(f["parse"]()).name("parse")
                .key_by(post_key, key_type=Types.LONG()).process(f["post"]()).name("post-features")
                .assign_timestamps_and_watermarks(wm))
    clicks = (enriched.key_by(lambda e: e[rt.K_USER], key_type=Types.LONG())
              .process(f["user"]()).name("user-features"))
    return clicks.key_by(lambda c: c[0], key_type=Types.LONG()).process(f["topic"]()).name("topic-features")


def run_embedded(cfg: Config, fail_once_on: str | None = None, detached: bool = True) -> Any:
    """Submit to a local MiniCluster; returns the JobClient (cancel it to stop)."""
    from infra.flink import stream_env

    env = stream_env(cfg, restart_configuration(cfg))
    build(env, cfg, fail_once_on).print()
    if detached:
        return env.execute_async("feedrank-features")
    env.execute("feedrank-features")
    return None


def main(argv: list[str]) -> None:
    """Entry point for `flink run -py jobs/feature_job.py [-- --feedrank-config FILE]`."""
    from infra.flink import job_config, stream_env

    logging.basicConfig(level=logging.INFO)
    cfg = job_config(argv)
    fail = argv[argv.index("--fail-once-on") + 1] if "--fail-once-on" in argv else None
    env = stream_env(cfg, restart_configuration(cfg))
    build(env, cfg, fail).print()
    env.execute("feedrank-features")


if __name__ == "__main__":
    main(sys.argv[1:])
