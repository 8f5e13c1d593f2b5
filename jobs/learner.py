"""Online learner job (PyFlink DataStream, thread mode): exposures + engagements -> guarded
final-layer updates of the heavy ranker, published to the model store.

    event lines ─ LearnerParseMap (exposures, engagements) ─ event-time watermarks
      ─ key_by(user, post) AttributionFunction   exposure ⋈ engagements within the attribution window
      ─ key_by(0)          LearnerFunction       served features (snapshots) -> SGD on the final layer,
                                                 holdout validation, promote / reject, live-CTR rollback

* Labels: an exposure collects the engagements of the same user and post whose event time
  falls within ``online_learning.attribution_window_s`` after it; an event-time timer closes
  the window (so late engagements inside the watermark's bound still count). Repeated
  event ids are ignored.
* Features: the exposure's ``snapshot_id`` names the feature rows serving scored
  (:mod:`features.snapshots`); examples whose snapshot expired are counted and skipped.
* Learning and decisions: :class:`models.online.OnlineLearner` (numpy: torch never returns
  inside a thread-mode worker). Validation runs every ``validate_every_s`` of the examples'
  event time.
* Every decision is logged, appended to the Redis list ``feedrank:learner:decisions``,
  counted in ``feedrank:jobs:learner:progress`` and in Flink metrics
  (``feedrank_learner_promoted`` / ``_rejected`` / ``_rolled_back``).
* State: the attribution state is Flink keyed state (checkpointed); the learner's weights
  live in the model store — after a restart the job continues from the current version.

Run embedded: ``feedrank jobs run learner``; on the cluster:
``flink run -py jobs/learner.py -pyexec .venv/bin/python -- --feedrank-config cfg.json``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import numpy as np

from core.config import Config
from core.schema import head_labels

log = logging.getLogger("feedrank.jobs.learner")
JOB = "learner"
DECISIONS = "feedrank:learner:decisions"
EXPOSURE, ENGAGEMENT = 0, 1


def parse(line: str) -> tuple | None:
    """(kind, event_id, ts, user, post, action, dwell_ms, position, snapshot_id, model_version) or None."""
    from core.events import InvalidEvent, parse_event

    try:
        ev: Any = parse_event(line)
    except InvalidEvent:
        return None  # the feature job counts and logs invalid events
    if ev.type == "exposure":
        return (EXPOSURE, ev.event_id, ev.ts, ev.user_id, ev.post_id, "", 0, ev.position, ev.snapshot_id or "",
                ev.model_version)
    if ev.type == "engagement":
        return (ENGAGEMENT, ev.event_id, ev.ts, ev.user_id, ev.post_id, ev.action, ev.dwell_ms or 0, 0, "", "")
    return None


def _functions(cfg: Config) -> dict[str, Any]:
    from pyflink.common import Types
    from pyflink.common.watermark_strategy import TimestampAssigner
    from pyflink.datastream import KeyedProcessFunction
    from pyflink.datastream.state import ValueStateDescriptor

    OL = cfg.online_learning
    window_ms = int(OL.attribution_window_s * 1000)

    class EventTime(TimestampAssigner):
        def extract_timestamp(self, value: tuple, record_timestamp: int) -> int:
            return value[2]

    class AttributionFunction(KeyedProcessFunction):
        """Keyed by (user, post): joins an exposure with the engagements that follow it."""

        def open(self, ctx: Any) -> None:
            from features.connection import redis_client
            from features.progress import PROGRESS_KEY

            self.state = ctx.get_state(ValueStateDescriptor("attr", Types.PICKLED_BYTE_ARRAY()))
            self.redis, self.key = redis_client(cfg), PROGRESS_KEY.format(job=JOB)
            self.n = {"attr_in": 0, "attr_exposures": 0, "attr_out": 0, "attr_timers": 0}

        def _count(self, k: str) -> None:
            self.n[k] += 1
            if self.n[k] % 5000 == 0:  # visible in `feedrank jobs status`-style progress
                self.redis.hset(self.key, mapping=self.n)

        def process_element(self, e: tuple, ctx: Any):
            self._count("attr_in")
            s = self.state.value() or {"exp": None, "eng": [], "ids": set()}
            if e[1] in s["ids"]:
                return  # a repeated event
            s["ids"].add(e[1])
            if e[0] == EXPOSURE:
                self._count("attr_exposures")
                if s["exp"] is not None:  # shown again: the earlier exposure's window ends here
                    yield self._example(ctx.get_current_key(), s, e[2])
                s["exp"] = (e[2], e[7], e[8], e[9])
                ctx.timer_service().register_event_time_timer(e[2] + window_ms)
            else:
                s["eng"].append((e[5], e[2], e[6]))
                ctx.timer_service().register_event_time_timer(e[2] + window_ms)  # forget orphans
            self.state.update(s)

        def _example(self, key: str, s: dict, until: int) -> tuple:
            ts, pos, snap, ver = s["exp"]
            mine = [g for g in s["eng"] if ts <= g[1] <= min(ts + window_ms, until)]
            user, post = (int(x) for x in key.split(":"))
            s["eng"] = [g for g in s["eng"] if g[1] > until]
            s["exp"] = None
            return (user, post, ts, pos, snap, ver, head_labels(mine, cfg.heads.long_dwell_ms))

        def on_timer(self, timestamp: int, ctx: Any):
            self._count("attr_timers")
            s = self.state.value()
            if s is None:
                return
            if s["exp"] is not None and timestamp >= s["exp"][0] + window_ms:
                self._count("attr_out")
                yield self._example(ctx.get_current_key(), s, timestamp)
            s["eng"] = [g for g in s["eng"] if g[1] > timestamp - window_ms]
            if s["exp"] is None and not s["eng"]:
                self.state.clear()
            else:
                self.state.update(s)

    class LearnerFunction(KeyedProcessFunction):
        """One instance: materialises examples, trains, validates, publishes, rolls back."""

        def open(self, ctx: Any) -> None:
            from jobs import startup_stacks

            startup_stacks.begin(cfg, "learner operator")
            try:
                self._open(ctx)
            finally:
                startup_stacks.end("learner operator")

        def _open(self, ctx: Any) -> None:
            from features.connection import redis_client
            from features.progress import PROGRESS_KEY
            from core.schema import HEAVY_SCHEMA_HASH
            from features.snapshots import SnapshotStore
            from models.online import LearnerLoop
            from models.store import ModelStore

            self.snapshots = SnapshotStore(cfg)
            self.redis = redis_client(cfg)
            self.progress_key = PROGRESS_KEY.format(job=JOB)
            self.loop = LearnerLoop(OL, ModelStore.from_config(cfg), HEAVY_SCHEMA_HASH)
            self.learner = self.loop.learner
            version = self.learner.current_version
            self.pending: list[tuple] = []
            self.boundary: int | None = None
            self.counts = {"examples": 0, "no_snapshot": 0, "promoted": 0, "rejected": 0, "rolled_back": 0,
                           "rebased": 0, "superseded": 0, "waits": 0}
            self.metrics = {}
            try:
                group = ctx.get_metrics_group()
                self.metrics = {k: group.counter(f"feedrank_learner_{k}")
                                for k in ("promoted", "rejected", "rolled_back", "rebased", "superseded")}
            except Exception as e:  # noqa: BLE001 - metrics are optional; Redis counters always exist
                log.warning("Flink metrics unavailable in this mode: %s", e)
            self.redis.hincrby(self.progress_key, "opened", 1)
            log.info("online learner starts from heavy %s (lr %.5f)", version, self.learner.lr)

        def process_element(self, ex: tuple, ctx: Any):
            # Decisions follow the examples' own event time: in thread mode a Python operator's
            # timer output can trail the watermark it forwards (measured: validation timers fired
            # minutes of event time ahead of the examples), so watermark timers would validate
            # on data that has not arrived yet.
            every = int(OL.validate_every_s * 1000)
            if self.boundary is None:
                self.boundary = (ex[2] // every + 1) * every
            if ex[2] >= self.boundary:
                self._decide(self.boundary)
                self.boundary = (ex[2] // every + 1) * every
            self.pending.append(ex)
            if len(self.pending) >= 64:
                self._materialize()
            return iter(())

        def _materialize(self) -> None:
            from models.online import Example

            pending, self.pending = self.pending, []
            snaps = self.snapshots.get_many(sorted({p[4] for p in pending if p[4]}))
            rows, metas = [], []
            for user, post, ts, pos, snap, ver, y in pending:
                got = snaps.get(snap)
                idx = np.flatnonzero(got[0] == post) if got is not None else []
                if len(idx) == 0:
                    self.counts["no_snapshot"] += 1
                    continue
                rows.append(got[1][idx[0]])
                metas.append((user, ts, pos, ver, y))
            if rows:
                z = self.learner.current.normalized(np.stack(rows)).astype(np.float32)
                h = self.learner.current.hidden(None, z=z)
                for i, (user, ts, pos, ver, y) in enumerate(metas):
                    self.learner.add(Example(h[i], z[i], np.asarray(y, dtype=np.float64), pos, user, ts, ver,
                                             x=rows[i]))
                self.counts["examples"] += len(rows)

        def _decide(self, timestamp: int) -> None:
            self._materialize()
            for d in self.loop.decide(timestamp):
                self._record(d)

        def _record(self, d: dict) -> None:
            d["decided_at_wall_ms"] = int(time.time() * 1000)  # event time says what it saw, this when it decided
            kind = {"promote": "promoted", "reject": "rejected", "rollback": "rolled_back", "rebase": "rebased",
                    "superseded": "superseded"}.get(d["decision"], "waits")
            self.counts[kind] += 1
            if kind in self.metrics:
                self.metrics[kind].inc()
            line = json.dumps(d)
            (log.info if kind == "waits" else log.warning)("learner decision: %s", line)
            with self.redis.pipeline(transaction=False) as p:
                p.lpush(DECISIONS, line)
                p.ltrim(DECISIONS, 0, 999)
                p.hset(self.progress_key, mapping={**{k: str(v) for k, v in self.counts.items()},
                                                   "current": self.learner.current_version,
                                                   "steps": str(self.learner.steps), "watermark_ms": str(d["at_ms"])})
                p.execute()

    return {"event_time": EventTime, "attribution": AttributionFunction, "learner": LearnerFunction}


#: Small Python bundles: output a Python function produces from a timer is released when its
#: bundle finishes, and a bundle only finishes on a later element or when full (measured: with
#: the default 100K elements, tens of thousands of examples waited for traffic that never came).
BUNDLE = {"python.fn-execution.bundle.size": "500", "python.fn-execution.bundle.time": "100"}


def build(env: Any, cfg: Config) -> Any:
    from pyflink.common import Duration, Types, WatermarkStrategy

    from jobs.sources import event_lines, source_watermarks

    f = _functions(cfg)
    wm = (WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_millis(cfg.streaming.out_of_orderness_ms))
          .with_timestamp_assigner(f["event_time"]()))
    events = event_lines(env, cfg, "events", JOB).map(parse).name("parse").filter(lambda e: e is not None)
    if not source_watermarks(cfg):  # Kafka: per-partition watermarks from the source
        events = events.assign_timestamps_and_watermarks(wm)
    examples = (events.key_by(lambda e: f"{e[3]}:{e[4]}", key_type=Types.STRING())
                .process(f["attribution"]()).name("attribution").uid("attribution"))
    return examples.key_by(lambda e: 0, key_type=Types.INT()).process(f["learner"]()).name("learner").uid("learner")


def read_decisions(cfg: Config, n: int = 1000) -> list[dict]:
    """The learner's decisions, oldest first."""
    from features.connection import redis_client

    return [json.loads(x) for x in reversed(redis_client(cfg).lrange(DECISIONS, 0, n - 1))]


def run_embedded(cfg: Config, resume: bool = True) -> Any:
    """Submit to a local MiniCluster; returns the JobClient (cancel it to stop). ``resume``: continue
    from the newest retained checkpoint of this job on this event log, if there is one."""
    from jobs.flinkenv import job_configuration, stream_env
    from jobs.feature_job import restart_configuration

    ckpt, restored = job_configuration(cfg, "learner", resume)
    if restored is not None:
        log.info("resuming from checkpoint %s", restored)
    env = stream_env(cfg, {**restart_configuration(cfg), **BUNDLE, **ckpt})
    build(env, cfg).print()
    return env.execute_async("feedrank-learner")


def main(argv: list[str]) -> None:
    """Entry point for `flink run -py jobs/learner.py [-- --feedrank-config FILE]`."""
    from jobs.flinkenv import job_config, job_configuration, stream_env
    from jobs.feature_job import restart_configuration

    logging.basicConfig(level=logging.INFO)
    cfg = job_config(argv)
    ckpt = job_configuration(cfg, "learner", resume=False, prune=False)[0]  # `flink run -s` restores
    env = stream_env(cfg, {**restart_configuration(cfg), **BUNDLE, **ckpt})
    build(env, cfg).print()
    env.execute("feedrank-learner")


if __name__ == "__main__":
    main(sys.argv[1:])
