"""Real-time feature job (PyFlink DataStream, thread mode): event log -> Feast online store.

    log records (bundles of events) ─ ParseBundle   validate, compact, group by post shard
      ─ key_by(post shard) PostFeaturesFunction      de-duplication, post_stats, new-post embeddings + index delta
      ─ event-time watermarks
      ─ key_by(user shard) UserFeaturesFunction      user_topic, user_embedding (user tower)
      ─ key_by(topic shard) TopicFeaturesFunction    topic_stats

* Micro-batches: PyFlink's cost per record and Python operator hop (~30 us measured, plus
  the hand-off of the one interpreter lock between task threads) capped the job at
  5.4K events/s when every event was a record (bench features; now 16-21K). A segment-log
  record is a bundle of up to ``events.bundle_events`` events; each operator emits one record per *shard*
  (``id % streaming.key_shards``) of what it received, and keeps per-post / per-user /
  per-topic state in MapStates of that shard. Records never wait in Python for a later one,
  so a checkpoint barrier always finds nothing buffered between operators.
* Validation: every event goes through :func:`core.events.parse_event`; malformed
  events are counted and logged with their reason, never passed on.
* De-duplication by event_id inside the post operator: every copy of an event has the
  same post (follows: the same user), hence the same shard. Ids live in two generations of
  ``streaming.dedupe_retention_s`` each; the older is cleared when a third begins, so an id
  is remembered for one to two retentions without a timer per id.
* Event time: 5-minute / 1-hour windows are per-minute buckets of event time. Watermarks
  (bounded out-of-orderness, a record's time = its latest event) come from the Kafka source,
  per partition (message timestamps), or for the file log are assigned after the post operator. The post operator re-pushes decayed velocities from processing-time timers,
  evaluated at the event time it has reached; the user and topic operators from event-time timers.
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
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config

log = logging.getLogger("feedrank.jobs.features")
JOB = "features"
#: test hook: a marker path; the first warm-up that finds it missing creates it and hangs (as a stuck
#: read at the first element did), so `feedrank jobs run` must restart the job (not FEEDRANK_*: the
#: configuration rejects unknown FEEDRANK_ variables)
STALL_WARM_UP_ONCE = "_FEEDRANK_STALL_WARM_UP_ONCE"


class Catalog:
    """What is known of posts and follows published before the stream starts (bootstrap)."""

    def __init__(self, cfg: Config):
        self.post_meta: np.ndarray | None = None  # [n, 4]: author, topic, ctype, published_ms
        self.follow_src = self.follow_dst = np.zeros(0, dtype=np.int64)
        world_dir = cfg.streaming.bootstrap_world
        if world_dir:
            from core.corpus import Corpus

            w = Corpus.load_corpus(cfg.path(world_dir))
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
    from pyflink.datastream import FlatMapFunction, KeyedProcessFunction, TimeDomain
    from pyflink.datastream.state import MapStateDescriptor, ValueStateDescriptor

    from features import realtime as rt
    from features.eventlog import split_bundle

    S = cfg.streaming
    long_dwell_ms = cfg.heads.long_dwell_ms

    shards = S.key_shards

    def _groups(events: list[tuple], key: Any, ts: int = rt.K_TS) -> list[tuple]:
        """``[(shard, events, latest event time)]``: one record per shard of a bundle (module docstring)."""
        by: dict[int, list[tuple]] = {}
        for e in events:
            by.setdefault(key(e) % shards, []).append(e)
        return [(k, v, max(e[ts] for e in v)) for k, v in by.items()]

    def post_shard(e: tuple) -> int:
        if e[0] < 0:
            return 0
        return e[rt.K_POST] if e[rt.K_KIND] not in rt.USER_KEYED else e[rt.K_USER]

    class ParseBundle(FlatMapFunction):
        """A log record (a bundle of RS-separated JSON events) -> compact tuples grouped by post shard.
        A malformed event becomes (-1, reason), is logged, and is counted by the post operator."""

        def open(self, ctx: Any) -> None:
            self.invalid = 0

        def flat_map(self, record: str):
            events = []
            for out in rt.compact_many(split_bundle(record)):
                if isinstance(out, str):
                    self.invalid += 1
                    if self.invalid <= 20 or self.invalid % 1000 == 0:
                        log.warning("invalid event #%d: %s", self.invalid, out)
                    out = (-1, out, 0)
                events.append(out)
            return _groups(events, post_shard)

    class EventTime(TimestampAssigner):
        def extract_timestamp(self, value: tuple, record_timestamp: int) -> int:
            return value[2]  # a group's latest event time

    class Buffered(KeyedProcessFunction):
        """Keeps the latest row per changed key; pushes them as one batch per flush interval."""

        view = ""

        def open(self, ctx: Any) -> None:
            from features.writer import FeatureWriter
            from jobs import startup_stacks

            startup_stacks.begin(cfg, f"{self.view} operator")
            gc_tuning(S.gc_young_threshold)
            self.writer = FeatureWriter(cfg)
            self.dirty: dict[int, Any] = {}
            self.last_flush = time.monotonic()
            self.flush_timer: int | None = None
            self.events = 0
            self.reported = 0  # events covered by the last progress report
            self.max_ts = 0

        def warm_up(self) -> None:
            """The bootstrap catalog and the towers load on the first element, not in ``open``: the job's
            operators open concurrently, and a short ``open`` keeps start-up quick and its stack dump
            (jobs/startup_stacks.py) about start-up alone. ``<view>_warming`` / ``<view>_warmed`` count its
            starts and ends, so `feedrank jobs run` restarts a job stuck in it (as one stuck in ``open``)."""
            from features.progress import PROGRESS_KEY
            from jobs import startup_stacks

            key = PROGRESS_KEY.format(job=JOB)
            self.writer.redis.hincrby(key, f"{self.view}_warming", 1)
            startup_stacks.begin(cfg, f"{self.view} warm-up")
            stall = os.environ.get(STALL_WARM_UP_ONCE)
            if stall and not Path(stall).exists():  # the test hook of the watchdog: hang here the first time
                Path(stall).write_text("stalled once")
                time.sleep(3600)
            self.catalog = Catalog(cfg)
            self.embedder.get()
            startup_stacks.end(f"{self.view} warm-up")
            self.writer.redis.hincrby(key, f"{self.view}_warmed", 1)

        def mark_opened(self) -> None:
            """``<view>_opened`` counts completed opens: restarts are visible, and `feedrank jobs run` restarts
            a job whose operators never finish opening (a PyFlink thread-mode start-up hang, seen intermittently)."""
            from features.progress import PROGRESS_KEY
            from jobs import startup_stacks

            self.writer.redis.hincrby(PROGRESS_KEY.format(job=JOB), f"{self.view}_opened", 1)
            startup_stacks.end(f"{self.view} operator")

        def after_update(self, ctx: Any) -> None:
            if len(self.dirty) >= S.max_buffer_rows or (self.dirty and time.monotonic() - self.last_flush >= S.flush_ms / 1000):
                self.flush()
            # a record may change no row (duplicates, invalid events): its counts are still reported
            if (self.dirty or self.events != self.reported) and self.flush_timer is None:
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

        def keyed_states(self, ctx: Any, name: str) -> None:
            """Per-shard state: ``self.rows`` maps a post / user / topic id to its pickled state;
            ``self.due`` maps a timer's timestamp to the ids it re-pushes (a shard holds many ids)."""
            self.rows = ctx.get_map_state(MapStateDescriptor(name, Types.LONG(), Types.PICKLED_BYTE_ARRAY()))
            self.due = ctx.get_map_state(MapStateDescriptor(f"{name}_due", Types.LONG(), Types.PICKLED_BYTE_ARRAY()))
            self.cache: dict[int, Any] = {}

        def get_row(self, k: int) -> Any:
            """A row's state through a write-through cache: a state read is a call into the JVM and an
            unpickle (~17% of the job's interpreter time measured). Safe because every change is put
            back (:meth:`store`) and a restart from a checkpoint builds a new operator, cache and all."""
            s = self.cache.get(k)
            if s is None:
                s = self.rows.get(k)
                if s is not None:
                    self.remember(k, s)
            return s

        def row(self, local: dict[int, Any], k: int, new: Any) -> Any:
            """The row of ``k`` for this record: already touched, cached, in state, or ``new(k)``."""
            s = local.get(k)
            if s is None:
                s = self.get_row(k)
                if s is None:
                    s = new(k)
                local[k] = s
            return s

        def remember(self, k: int, s: Any) -> None:
            if len(self.cache) >= S.state_cache_rows:
                self.cache.clear()  # cheaper than LRU bookkeeping; hot rows return on their next read
            self.cache[k] = s

        def schedule(self, ctx: Any, pending: dict[int, set[int]], event_time: bool) -> None:
            """Remember which ids each timer re-pushes; register the timer when its first id arrives."""
            timers = ctx.timer_service()
            for due, ids in pending.items():
                old = self.due.get(due)
                if old is None:
                    if event_time:
                        timers.register_event_time_timer(due)
                    else:
                        timers.register_processing_time_timer(due)
                else:
                    ids.update(old)
                self.due.put(due, list(ids))

        def take_due(self, timestamp: int) -> list[int]:
            ids = self.due.get(timestamp)
            if ids is None:
                return []
            self.due.remove(timestamp)
            return ids

        def store(self, local: dict[int, Any]) -> None:
            """Put a group's changed rows back: one call into the JVM for all of them."""
            if local:
                self.rows.put_all(local)
                for k, v in local.items():
                    self.remember(k, v)

        def flush(self) -> None:
            self.last_flush = time.monotonic()
            self.reported = self.events
            if self.dirty:
                rows, self.dirty = self.dirty, {}
                self.write(rows)
            self.writer.progress(JOB, {f"{self.view}_events": self.events, f"{self.view}_max_ts": self.max_ts,
                                       f"{self.view}_pushed_rows": self.writer.pushed_rows,
                                       f"{self.view}_push_seconds": round(self.writer.push_seconds, 3),
                                       f"{self.view}_flushed_at_ms": int(time.time() * 1000),
                                       **gc_progress()})

        def write(self, rows: dict[int, Any]) -> None:
            """Each subclass writes its view's rows (``{key: (state, as-of time)}``)."""

    class PostFeaturesFunction(Buffered):
        """Keyed by post shard (follows: user shard): drops repeated event_ids and invalid events, keeps
        engagement statistics, enriches engagements with the post's author/topic/content type for the
        user and topic operators, and embeds newly published posts for retrieval."""

        view = "post"

        def open(self, ctx: Any) -> None:
            super().open(ctx)
            self.keyed_states(ctx, "posts")
            self.seen = [ctx.get_map_state(MapStateDescriptor(f"seen{i}", Types.STRING(), Types.LONG())) for i in (0, 1)]
            self.seen_gen = ctx.get_state(ValueStateDescriptor("seen_gen", Types.PICKLED_BYTE_ARRAY()))
            self.catalog: Catalog | None = None  # loaded with the towers on the first element (see warm_up)
            self.new_posts: list[tuple] = []
            self.embedder = PostEmbedder(cfg)
            self.fault = fail_once_on
            self.fault_marker = cfg.data_dir / "flink" / f"fault-{fail_once_on}.done"
            self.counts = {"events": 0, "duplicates": 0, "invalid": 0}
            self.retention_ms = int(S.dedupe_retention_s * 1000)
            self.mark_opened()

        def seen_maps(self, now: int) -> tuple[Any, Any]:
            """(this generation's ids, the previous generation's or None). A generation is one retention
            period of processing time; the older one is cleared when a third begins, so an id is
            remembered for between one and two retentions, with no per-id timers."""
            g = now // self.retention_ms
            gens = self.seen_gen.value() or [-1, -1]
            cur, prev = g % 2, 1 - g % 2
            changed = False
            if gens[cur] != g:
                self.seen[cur].clear()
                gens[cur], changed = g, True
            if gens[prev] not in (g - 1, -1):
                self.seen[prev].clear()
                gens[prev], changed = -1, True
            if changed:
                self.seen_gen.update(gens)
            return self.seen[cur], (self.seen[prev] if gens[prev] == g - 1 else None)

        def process_element(self, group: tuple, ctx: Any):
            if self.catalog is None:
                self.warm_up()
            events = group[1]
            self.events += len(events)
            self.counts["events"] += len(events)
            now = int(time.time() * 1000)  # Flink's processing time is the wall clock: no call into the JVM
            seen, older = self.seen_maps(now)
            local: dict[int, list] = {}
            decay: dict[int, set[int]] = {}
            forward: list[tuple] = []
            fresh: dict[str, int] = {}  # this group's new ids, stored with one put_all
            for e in events:
                if e[0] < 0:
                    self.counts["invalid"] += 1
                    continue
                eid = e[rt.K_ID]
                if eid in fresh or seen.contains(eid) or (older is not None and older.contains(eid)):
                    self.counts["duplicates"] += 1
                    continue
                fresh[eid] = now
                if self.fault and eid == self.fault and not self.fault_marker.exists():
                    self.fault_marker.parent.mkdir(parents=True, exist_ok=True)
                    self.fault_marker.touch()
                    raise RuntimeError(f"injected failure at event {self.fault} (test of restart from checkpoint)")
                kind = e[rt.K_KIND]
                if kind in rt.USER_KEYED:
                    forward.append(e)
                    continue
                self.max_ts = max(self.max_ts, e[rt.K_TS])
                pid = e[rt.K_POST]
                s = self.row(local, pid, lambda p: rt.new_post_state(self.catalog.post(p)))
                if rt.post_update(s, e, long_dwell_ms):
                    self.dirty[pid] = (s, None)
                if kind == rt.PUBLISH:
                    self.new_posts.append(e)
                elif kind == rt.ENGAGEMENT:  # views too: the user function keeps the session
                    if e[rt.K_ACTION] == rt.A["click"]:  # re-push when the click leaves the 5 min / 1 h windows
                        for after in (5 * rt.MINUTE_MS, 60 * rt.MINUTE_MS):
                            decay.setdefault(_tagged(now + after, 2, 10_000), set()).add(pid)
                    meta = s[rt.P_META]
                    if meta is not None:
                        e = e[:rt.K_AUTHOR] + (meta[0],) + e[rt.K_AUTHOR + 1:rt.K_TOPIC] + (meta[1], meta[2]) + e[rt.K_TEXT:]
                    forward.append(e)
            if fresh:
                seen.put_all(fresh)
            self.store(local)
            self.schedule(ctx, decay, event_time=False)
            self.after_update(ctx)
            return iter(_groups(forward, lambda e: e[rt.K_USER]))

        def on_other_timer(self, timestamp: int, ctx: Any) -> None:
            if timestamp % 10 == 2:  # velocities decay as event time passes
                for pid in self.take_due(timestamp):
                    s = self.get_row(pid)
                    if s is not None:
                        self.dirty[pid] = (s, max(s[rt.P_LAST], self.max_ts))

        def write(self, rows: dict[int, Any]) -> None:
            ids = np.fromiter(rows.keys(), dtype=np.int64, count=len(rows))
            ints, floats = rt.post_rows(list(rows.values()))
            self.writer.push_post_stats(ids, ints, floats)

        def flush(self) -> None:
            if self.new_posts:
                posts, self.new_posts = self.new_posts, []
                self.embedder.publish(self.writer, posts)
            super().flush()
            self.writer.progress(JOB, {f"dedupe_{k}": v for k, v in self.counts.items()})

    class UserFeaturesFunction(Buffered):
        """Keyed by user shard: topic preferences with negative feedback, recent engagement, follows;
        the user embedding is recomputed by the user tower for every user whose inputs changed."""

        view = "user"

        def open(self, ctx: Any) -> None:
            super().open(ctx)
            self.keyed_states(ctx, "users")
            self.catalog: Catalog | None = None  # loaded with the towers on the first element (see warm_up)
            self.embedder = UserEmbedder(cfg)
            self.mark_opened()

        def mark(self, uid: int, s: list, feats: bool, emb: bool, session: bool) -> None:
            old = self.dirty.get(uid)
            self.dirty[uid] = (s, feats or (old is not None and old[1]), emb or (old is not None and old[2]),
                               session or (old is not None and old[3]))

        def process_element(self, group: tuple, ctx: Any):
            if self.catalog is None:
                self.warm_up()
            events = group[1]
            self.events += len(events)
            local: dict[int, list] = {}
            hour: dict[int, set[int]] = {}
            clicks: list[tuple] = []
            for e in events:
                uid = e[rt.K_USER]
                s = self.row(local, uid, lambda u: rt.new_user_state(self.catalog.follows(u)))
                feats, emb, session = rt.user_update(s, e, long_dwell_ms)
                self.max_ts = max(self.max_ts, e[rt.K_TS])
                if feats or emb or session:
                    self.mark(uid, s, feats, emb, session)
                if e[rt.K_KIND] == rt.ENGAGEMENT and e[rt.K_ACTION] == rt.A["click"]:
                    hour.setdefault((e[rt.K_TS] // rt.MINUTE_MS + 60) * rt.MINUTE_MS, set()).add(uid)
                    if e[rt.K_TOPIC] >= 0:
                        clicks.append((e[rt.K_TOPIC], e[rt.K_TS]))
            self.store(local)
            self.schedule(ctx, hour, event_time=True)
            self.after_update(ctx)
            return iter(_groups(clicks, lambda c: c[0], ts=1))

        def on_other_timer(self, timestamp: int, ctx: Any) -> None:
            for uid in self.take_due(timestamp):
                s = self.get_row(uid)
                if s is not None:
                    s[rt.U_LAST] = max(s[rt.U_LAST], timestamp)  # clicks_1h as of the watermark
                    self.store({uid: s})
                    self.mark(uid, s, True, False, False)

        def write(self, rows: dict[int, Any]) -> None:
            feat = [(uid, s) for uid, (s, f, _, _) in rows.items() if f]
            if feat:
                self.writer.write("user_topic", np.array([u for u, _ in feat], dtype=np.int64),
                                  rt.user_rows([s for _, s in feat]))
            sess = [(uid, s) for uid, (s, _, _, ss) in rows.items() if ss]
            if sess:
                self.writer.write("user_session", np.array([u for u, _ in sess], dtype=np.int64),
                                  rt.session_rows([s for _, s in sess]))
            emb = [(uid, s) for uid, (s, _, e, _) in rows.items() if e]
            if emb:
                self.embedder.publish(self.writer, emb)

    class TopicFeaturesFunction(Buffered):
        """Keyed by topic shard: click velocity over 5 minutes / 1 hour and the trend against the long run."""

        view = "topic"

        def open(self, ctx: Any) -> None:
            super().open(ctx)
            self.keyed_states(ctx, "topics")
            self.mark_opened()

        def process_element(self, group: tuple, ctx: Any):
            clicks = group[1]
            self.events += len(clicks)
            local: dict[int, list] = {}
            due: dict[int, set[int]] = {}
            for topic, ts in clicks:
                s = self.row(local, topic, lambda _: rt.new_topic_state())
                rt.topic_update(s, ts)
                self.max_ts = max(self.max_ts, ts)
                self.dirty[topic] = (s, None)
                m = ts // rt.MINUTE_MS
                for after in (5, 60):
                    due.setdefault((m + after) * rt.MINUTE_MS, set()).add(topic)
            self.store(local)
            self.schedule(ctx, due, event_time=True)
            self.after_update(ctx)
            return iter(())

        def on_other_timer(self, timestamp: int, ctx: Any) -> None:
            for topic in self.take_due(timestamp):
                s = self.get_row(topic)
                if s is not None:
                    self.dirty[topic] = (s, timestamp)

        def write(self, rows: dict[int, Any]) -> None:
            from features.feast_repo import TOPIC_STATS_FLOAT

            vals = np.array([rt.topic_row(s, now) for s, now in rows.values()], dtype=np.float32)
            self.writer.write("topic_stats", np.fromiter(rows.keys(), dtype=np.int64, count=len(rows)),
                              {n: vals[:, j] for j, n in enumerate(TOPIC_STATS_FLOAT)})

    return {"parse": ParseBundle, "event_time": EventTime, "post": PostFeaturesFunction,
            "user": UserFeaturesFunction, "topic": TopicFeaturesFunction}


_GC: dict[str, Any] = {"seconds": 0.0, "full": 0, "started": 0.0, "installed": False}


def gc_tuning(young_threshold: int) -> None:
    """Collect the young generation every ``young_threshold`` net allocations (default 700) and time
    every collection (reported as ``gc_seconds`` / ``gc_full`` in the job's progress).

    Why: the operators' row caches hold ~10^6 live objects, and with Python's defaults full
    collections ran 16 times in a 300K-event run, ~170 ms each with the interpreter lock held
    (2.7 s of 3.6 s in GC). A larger young threshold makes every older collection rarer too.
    The setting is the embedded interpreter's, shared by every operator in it; idempotent."""
    import gc

    gc.set_threshold(young_threshold, 10, 10)
    if _GC["installed"]:
        return

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            _GC["started"] = time.perf_counter()
            return
        _GC["seconds"] += time.perf_counter() - _GC["started"]
        _GC["full"] += info["generation"] == 2

    gc.callbacks.append(timed)
    _GC["installed"] = True


def gc_progress() -> dict[str, float]:
    """GC time so far, for the progress hash. A module function, not the dict: the operator classes
    are pickled by value with the job, and so would be a dict they referenced."""
    return {"gc_seconds": round(_GC["seconds"], 3), "gc_full": _GC["full"]}


def _tagged(ts: int, tag: int, granularity: int = 10) -> int:
    """A processing-time timer timestamp rounded up to ``granularity`` ms with ``tag`` in its last
    digit: one key may hold flush (0) and velocity-decay (2) timers, and Flink
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
        writer.write("post_embedding", ids, {"embedding": emb})
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
        dense = rt.user_dense_many([s for _, s in users])
        lens = [max(len(s[rt.U_FOLLOWS]), 1) for _, s in users]
        ids = np.concatenate([author_bucket(np.array(s[rt.U_FOLLOWS] or [0], dtype=np.int64)) if s[rt.U_FOLLOWS]
                              else np.zeros(1, dtype=np.int64) for _, s in users])
        offs = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        emb = model.user(dense, ids, offs)
        writer.write("user_embedding", np.array([u for u, _ in users], dtype=np.int64), {"embedding": emb})


def restart_configuration(cfg: Config) -> dict[str, str]:
    return {"restart-strategy.type": "fixed-delay",
            "restart-strategy.fixed-delay.attempts": str(cfg.streaming.restart_attempts),
            "restart-strategy.fixed-delay.delay": "1 s"}


def build(env: Any, cfg: Config, fail_once_on: str | None = None) -> Any:
    """The whole pipeline (see the module docstring for its shape)."""
    from pyflink.common import Duration, Types, WatermarkStrategy

    from features.feast_repo import apply
    from jobs.sources import event_records, source_watermarks

    apply(cfg)  # registers views and push sources (idempotent), so the job runs on a fresh stack
    f = _functions(cfg, fail_once_on)
    wm = (WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_millis(cfg.streaming.out_of_orderness_ms))
          .with_timestamp_assigner(f["event_time"]()))
    shard = lambda g: g[0]  # noqa: E731 - records are (shard, events, latest event time)
    enriched = (event_records(env, cfg, "events", JOB).flat_map(f["parse"]()).name("parse").uid("parse")
                .key_by(shard, key_type=Types.LONG()).process(f["post"]()).name("post-features").uid("post-features"))
    if not source_watermarks(cfg):  # Kafka: per-partition watermarks from the source
        enriched = enriched.assign_timestamps_and_watermarks(wm)
    clicks = enriched.key_by(shard, key_type=Types.LONG()).process(f["user"]()).name("user-features").uid("user-features")
    return clicks.key_by(shard, key_type=Types.LONG()).process(f["topic"]()).name("topic-features").uid("topic-features")


def run_embedded(cfg: Config, fail_once_on: str | None = None, detached: bool = True, resume: bool = True) -> Any:
    """Submit to a local MiniCluster; returns the JobClient (cancel it to stop). ``resume``: continue
    from the newest retained checkpoint of this job on this event log, if there is one."""
    from jobs.flinkenv import job_configuration, stream_env

    ckpt, restored = job_configuration(cfg, JOB, resume)
    if restored is not None:
        log.info("resuming from checkpoint %s", restored)
    env = stream_env(cfg, {**restart_configuration(cfg), **ckpt})
    build(env, cfg, fail_once_on).print()
    if detached:
        return env.execute_async("feedrank-features")
    env.execute("feedrank-features")
    return None


def main(argv: list[str]) -> None:
    """Entry point for `flink run -py jobs/feature_job.py [-- --feedrank-config FILE]`."""
    from jobs.flinkenv import job_config, job_configuration, stream_env

    logging.basicConfig(level=logging.INFO)
    cfg = job_config(argv)
    fail = argv[argv.index("--fail-once-on") + 1] if "--fail-once-on" in argv else None
    # `flink run -s <checkpoint>` restores; the checkpoint directory is this job's on this event log
    env = stream_env(cfg, {**restart_configuration(cfg), **job_configuration(cfg, JOB, resume=False, prune=False)[0]})
    build(env, cfg, fail).print()
    env.execute("feedrank-features")


if __name__ == "__main__":
    main(sys.argv[1:])
