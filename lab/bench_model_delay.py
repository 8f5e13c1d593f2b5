"""`feedrank bench model-delay`: event -> promoted model serving, measured in real time.

On an isolated stack (its own Redis, event log and copy of the model store): simulated
users call the FeedService over gRPC; the PyFlink online learner joins their exposures and
engagements, validates a candidate every ``validate_every_s`` of event time and promotes
what passes its guardrails; the server hot-reloads. A trend shift early in the run gives
the learner something real to learn. Every GetFeed response names the model version that
ranked it, so for each promoted version we know when it first served.

Per promotion (event time ~ wall time here: the clock runs at 1x, but each simulated session
stamps its scroll events on its own timeline, up to a session ahead of the wall clock, so the
event-time based figures below understate; published -> serving is wall time on both ends):

    exposure -> serving    first response ranked by the version, minus the time the newest
                           exposures it learned from were served (the validation boundary)
    labels closed -> published
                           publish time minus (boundary + attribution window): the learner's own lag
                           (also for every decision, promoted or not)
    published -> serving   first response with the version minus its publish time (reload polling)
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config

#: Learner settings of the measurement (production values in feedrank.toml; stated in the result).
LEARNER = {"FEEDRANK_ONLINE_LEARNING_HOLDOUT_FRACTION": "0.2", "FEEDRANK_ONLINE_LEARNING_MIN_HOLDOUT": "150",
           "FEEDRANK_ONLINE_LEARNING_MIN_HOLDOUT_POSITIVES": "10", "FEEDRANK_ONLINE_LEARNING_BATCH_SIZE": "32",
           "FEEDRANK_ONLINE_LEARNING_VALIDATE_EVERY_S": "30", "FEEDRANK_ONLINE_LEARNING_ATTRIBUTION_WINDOW_S": "30",
           "FEEDRANK_ONLINE_LEARNING_HOLDOUT_WINDOW_S": "600"}


def bench_model_delay(cfg: Config, world_dir: Path, users: int = 300, minutes: float = 5.0,
                      progress=None) -> dict[str, Any]:
    from features.feast_repo import apply, export
    from runtime import stack
    from lab.bench import isolated_config
    from lab.bench_serve import load_user_rows
    from runtime.procs import ProcessGroup, child_env
    from jobs.learner import read_decisions
    from models.store import ModelStore
    from serving.client import GrpcFeedApi
    from serving.server import Server
    from sim.clients import Population, WallClock
    from lab.trend_shift_experiment import wait_progress, shutdown
    from sim.world import TrendShift, World

    step = progress or (lambda s, f: None)
    bcfg = isolated_config(cfg, "model-delay")
    store = ModelStore("file://" + str(bcfg.data_dir / "models"), cache_dir=bcfg.data_dir / "model-cache")
    ModelStore.from_config(cfg).copy_current(store)
    base_version = store.current("heavy")
    bcfg = bcfg.model_copy(update={"model_store": bcfg.model_store.model_copy(update={"uri": store.uri})})
    stack.up(bcfg)
    procs = ProcessGroup(bcfg.data_dir / "log")
    procs.log_dir.mkdir(parents=True, exist_ok=True)
    server = api = None
    first_served: dict[str, float] = {}
    lock = threading.Lock()
    try:
        step("Feast export of the world", 0.0)
        apply(bcfg)
        export(bcfg, world_dir)
        load_user_rows(bcfg, step)
        exe = str(Path(sys.executable).parent / "feedrank")
        step("starting the online learner", 0.0)
        procs.start("learner", [exe, "jobs", "run", "learner"], child_env(bcfg, **LEARNER))
        wait_progress(bcfg, {"learner": "opened"}, procs)
        world = World.load(world_dir)
        clock = WallClock(world.end_ms, speed=1.0)
        sim0, wall0 = clock.now_ms(), time.time()
        world.trends.append(TrendShift(int(cfg.sim.trend_shifts[0].topic) if cfg.sim.trend_shifts else 3,
                                       sim0 + 30_000, 1.5))
        server = Server(bcfg, bootstrap_dir=world_dir, clock=clock.now_ms, port=0, metrics_port=0, http_port=0)
        api = GrpcFeedApi(server.address, bcfg.serving.jwt_secret, timeout_s=30)
        real_get = api.get_feed

        def get_feed(user_id: int, feed_type: str = "home", cursor: str = "", limit: int = 20, now_ms=None):
            page = real_get(user_id, feed_type, cursor, limit, now_ms)
            t = time.time()
            with lock:
                first_served.setdefault(page.model_version, t)
            return page

        api.get_feed = get_feed  # type: ignore[method-assign]
        pop = Population(world, cfg.clients.model_copy(update={"session_gap_s": 60.0}), users, seed=cfg.sim.seed,
                         page_size=cfg.funnel.page_size, repost_rate=cfg.sim.repost_rate,
                         policy_flag_rate=cfg.sim.policy_flag_rate)

        def on_tick(elapsed_ms: int, st: Any) -> None:
            step("simulated users (real time)", min(1.0, elapsed_ms / (minutes * 60_000)))

        st = pop.run(api, clock, minutes * 60.0, on_tick=on_tick)
        decisions = [d for d in read_decisions(bcfg) if d.get("decision") in ("promote", "reject", "rollback")]
    finally:
        shutdown(api, server, procs)
        stack.down(bcfg)

    window_s = float(LEARNER["FEEDRANK_ONLINE_LEARNING_ATTRIBUTION_WINDOW_S"])
    # every decision: from the moment its newest examples' labels closed until the learner decided
    decide = [d["decided_at_wall_ms"] / 1000.0 - (wall0 + (d["at_ms"] - sim0) / 1000.0) - window_s
              for d in decisions if "decided_at_wall_ms" in d]
    rows = []
    for d in decisions:
        if d["decision"] != "promote" or "version" not in d:
            continue
        published = store.meta("heavy", d["version"]).created_at
        boundary_wall = wall0 + (d["at_ms"] - sim0) / 1000.0
        served = first_served.get(d["version"])
        rows.append({"version": d["version"], "boundary_wall_s": round(boundary_wall - wall0, 1),
                     "labels_closed_to_published_s": round(published - boundary_wall - window_s, 2),
                     "published_to_serving_s": round(served - published, 2) if served else None,
                     "exposure_to_serving_s": round(served - boundary_wall, 2) if served else None})

    def q(key: str) -> dict[str, float | None]:
        v = np.array([r[key] for r in rows if r[key] is not None], dtype=np.float64)
        return {"p50": round(float(np.percentile(v, 50)), 2) if v.size else None,
                "max": round(float(v.max()), 2) if v.size else None, "n": int(v.size)}

    return {"users": users, "minutes": minutes, "sessions": st.sessions, "get_feed_errors": st.errors,
            "learner_settings": LEARNER, "model_poll_interval_s": bcfg.model_store.poll_interval_s,
            "base_version": base_version,
            "decisions": {k: sum(d["decision"] == k for d in decisions) for k in ("promote", "reject", "rollback")},
            "promotions": rows, "exposure_to_serving_s": q("exposure_to_serving_s"),
            "labels_closed_to_published_s": q("labels_closed_to_published_s"),
            "labels_closed_to_decision_s_all_decisions": {
                "p50": round(float(np.percentile(decide, 50)), 2) if decide else None,
                "max": round(float(max(decide)), 2) if decide else None, "n": len(decide)},
            "published_to_serving_s": q("published_to_serving_s"),
            "versions_served": len(first_served),
            "note": "published -> serving is wall time on both ends. The event-time figures (exposure -> serving, "
                    "labels closed -> published) map event time to wall time at 1x, but simulated sessions stamp "
                    "their scroll events on their own timeline, up to a session's length ahead of the wall clock, so "
                    "they understate (negative values). By construction: exposure -> serving = attribution window "
                    "+ up to one validation interval + learner lag + published -> serving"}
