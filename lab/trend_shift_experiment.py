"""Trend-shift experiment: online learning on vs off (frozen heavy ranker) after the truth changes.

Two arms serve the *same* simulated users (same seed) from the *same* starting models, each
on its own event log, Redis state and copy of the model store:

    frozen          FeedService + PyFlink feature job (real-time features); the heavy ranker never changes
    online          the same, plus the PyFlink online learner job, which promotes guarded final-layer
                    updates into the arm's model store; the server hot-reloads them
    online_strict   the same learner under a stricter promotion rule (holdout AUC may not fall)

Midway through the window one topic's true appeal jumps (``boost`` on the engagement logit);
nobody is told. Time runs ``speed`` times faster than the wall clock (a WallClock: the jobs
and the server see consistent event time; the model-reload delay is real wall time, so it
is ``speed`` times longer in simulated time than in production).

Measured per simulated ``bucket_min`` minutes: expected utility of the served pages
(examination-weighted true utility; independent of the clients' random clicks), the part
of it from the shifted topic, the shifted topic's share of served items, realised utility
per examined item and CTR; plus the learner's decisions.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.config import Config
from lab.oracle import OracleCeiling

Step = Callable[[str, float], None]
#: Each arm's learner: None = no learner (the frozen heavy ranker); otherwise settings over feedrank.toml's.
ARMS: dict[str, dict[str, str] | None] = {
    "frozen": None,
    "online": {},                                                     # the seeds' rule: AUC may fall <= 1%
    "online_strict": {"FEEDRANK_ONLINE_LEARNING_MAX_AUC_DROP": "0"},  # holdout AUC may not fall at all
}

#: The learner's settings for a few hundred simulated users (production: feedrank.toml); the
#: guardrails (learning-rate cap, clipping, significance test, drift and rollback checks) are unchanged.
LEARNER = {"FEEDRANK_ONLINE_LEARNING_HOLDOUT_FRACTION": "0.2", "FEEDRANK_ONLINE_LEARNING_MIN_HOLDOUT": "300",
           "FEEDRANK_ONLINE_LEARNING_MIN_HOLDOUT_POSITIVES": "20", "FEEDRANK_ONLINE_LEARNING_BATCH_SIZE": "64",
           "FEEDRANK_ONLINE_LEARNING_VALIDATE_EVERY_S": "120", "FEEDRANK_ONLINE_LEARNING_ATTRIBUTION_WINDOW_S": "120",
           "FEEDRANK_ONLINE_LEARNING_HOLDOUT_WINDOW_S": "900"}


class ShiftRecorder:
    """Wraps a FeedApi: scores each served page against the ground truth when it is served."""

    def __init__(self, api: Any, world: Any, clock: Any, topic: int, t0_ms: int, bucket_ms: int, end_ms: int):
        self.api, self.world, self.clock, self.topic = api, world, clock, topic
        self.t0_ms, self.bucket_ms, self.end_ms = t0_ms, bucket_ms, end_ms
        self.exam = world.examination_prob(np.arange(1, 201))
        self.oracle = OracleCeiling(world)
        self.buckets: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        # (ms since start, expected utility, ... from the topic, of the oracle order, of the oracle over all posts)
        self.pages: list[tuple[int, float, float, float, float]] = []

    def get_feed(self, user_id: int, feed_type: str = "home", cursor: str = "", limit: int = 20, now_ms=None):
        page = self.api.get_feed(user_id, feed_type, cursor, limit, now_ms=now_ms)
        w = self.world
        items = [it for it in page.items if it.post_id < w.n_posts]
        now = self.clock.now_ms()
        if items and now < self.end_ms:  # the tails of sessions running past the window are not scored
            posts = np.array([it.post_id for it in items], dtype=np.int64)
            pos = np.minimum(np.array([it.position for it in items]), 200) - 1
            eu = w.true_utility(user_id, posts, now) * self.exam[pos]
            on = w.post_topic[posts] == self.topic
            b = self.buckets[(now - self.t0_ms) // self.bucket_ms]
            b["pages"] += 1
            b["items"] += posts.size
            b["shift_items"] += float(on.sum())
            b["expected_utility"] += float(eu.sum())
            b["shift_expected_utility"] += float(eu[on].sum())
            o = self.oracle.page(user_id, posts, pos + 1, now)
            self.pages.append((now - self.t0_ms, float(eu.sum()), float(eu[on].sum()), o["oracle_order_expected_utility"],
                               o["oracle_all_expected_utility"]))
            b.setdefault("model_versions", set()).add(page.model_version)  # type: ignore[union-attr]
        return page

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)


def shutdown(api: Any, server: Any, procs: Any) -> None:
    """Close the client, stop the in-process server, stop the job processes (whichever were started)."""
    if api is not None:
        api.close()
    if server is not None:
        server.stop(grace=1.0)
    procs.stop()


def wait_progress(cfg: Config, jobs: dict[str, str], procs: Any, timeout: float = 300.0) -> None:
    from features.progress import read_progress

    t0 = time.time()
    while time.time() - t0 < timeout:
        procs.check()
        if all(read_progress(cfg, job).get(key) for job, key in jobs.items()):
            return
        time.sleep(1.0)
    from lab.demo import job_diagnostics

    raise RuntimeError(f"the PyFlink jobs did not start in {timeout:.0f} s\n" + job_diagnostics(cfg, procs))


def run_arm(cfg: Config, arm: str, world_dir: Path, users: int, minutes: float, speed: float, seed: int,
            topic: int, boost: float, bucket_min: float, step: Step) -> dict[str, Any]:
    """One arm on a fresh event log, Redis state and model-store copy (``cfg``'s stack must be up)."""
    from features.connection import redis_client
    from features.progress import read_progress
    from lab.bench_serve import load_user_rows
    from runtime.procs import ProcessGroup, child_env
    from jobs.learner import read_decisions
    from models.store import ModelStore
    from serving.client import GrpcFeedApi
    from serving.edge import RateLimiter
    from serving.server import Server
    from sim.clients import Population, WallClock
    from sim.world import TrendShift, World

    root = cfg.data_dir / f"trend-{arm}"
    store = ModelStore("file://" + str(root / "models"), cache_dir=root / "model-cache")
    ModelStore.from_config(cfg).copy_current(store)
    acfg = cfg.model_copy(update={
        "events": cfg.events.model_copy(update={"uri": "file://" + str(root / "events")}),
        "model_store": cfg.model_store.model_copy(update={"uri": store.uri})})
    redis_client(acfg).flushdb()  # same starting state for both arms
    load_user_rows(acfg, lambda s, f: None)
    world = World.load(world_dir)
    procs = ProcessGroup(root / "log")
    (root / "log").mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).parent / "feedrank")
    env = child_env(acfg, FEEDRANK_STREAMING_BOOTSTRAP_WORLD=str(world_dir), **LEARNER, **(ARMS[arm] or {}))
    learns = ARMS[arm] is not None
    server = api = None
    try:
        step(f"{arm}: starting the PyFlink jobs", 0.0)
        procs.start("feature-job", [exe, "jobs", "run", "features"], env)
        wait = {"features": "post_opened"}
        if learns:
            procs.start("learner", [exe, "jobs", "run", "learner"], env)
            wait["learner"] = "opened"
        wait_progress(acfg, wait, procs)
        clock = WallClock(world.end_ms, speed=speed)
        t0_ms = clock.now_ms()
        shift_at = t0_ms + int(minutes * 30_000)
        world.trends.append(TrendShift(topic, shift_at, boost))
        server = Server(acfg, bootstrap_dir=world_dir, clock=clock.now_ms, port=0, metrics_port=0, http_port=0)
        server.service.limiter = RateLimiter(1e9, 10**9)  # simulated time runs faster than the per-user limit assumes
        api = GrpcFeedApi(server.address, cfg.serving.jwt_secret, timeout_s=30)
        rec = ShiftRecorder(api, world, clock, topic, t0_ms, int(bucket_min * 60_000), t0_ms + int(minutes * 60_000))
        pop = Population(world, cfg.clients, users, seed=seed, page_size=cfg.funnel.page_size,
                         repost_rate=cfg.sim.repost_rate, policy_flag_rate=cfg.sim.policy_flag_rate)
        realised: dict[int, dict[str, float]] = {}
        last = {"bucket": 0, "utility": 0.0, "examined": 0, "impressions": 0, "clicks": 0}
        bucket_ms = int(bucket_min * 60_000)

        def close_bucket(st: Any) -> None:
            realised[last["bucket"]] = {"utility": st.utility - last["utility"], "examined": st.examined - last["examined"],
                                        "impressions": st.impressions - last["impressions"],
                                        "clicks": st.actions["click"] - last["clicks"]}
            last.update(utility=st.utility, examined=st.examined, impressions=st.impressions, clicks=st.actions["click"])

        def on_tick(elapsed_ms: int, st: Any) -> None:
            if elapsed_ms // bucket_ms > last["bucket"]:
                close_bucket(st)
                last["bucket"] = elapsed_ms // bucket_ms
                step(f"{arm}: {elapsed_ms / 60000:.0f}/{minutes:g} simulated min", elapsed_ms / (minutes * 60_000))
                procs.check()

        st = pop.run(rec, clock, minutes * 60.0, on_tick=on_tick)
        close_bucket(st)
        decisions = [d for d in read_decisions(acfg) if d.get("decision") != "wait"]
        learner = read_progress(acfg, "learner")
    finally:
        shutdown(api, server, procs)
    timeline = []
    for b in sorted(rec.buckets):
        r = rec.buckets[b]
        z = realised.get(b) or {}
        timeline.append({"t_min": round((b + 0.5) * bucket_min, 2), "pages": int(r["pages"]),
                         "page_expected_utility": round(r["expected_utility"] / r["pages"], 4),
                         "shift_expected_utility_per_page": round(r["shift_expected_utility"] / r["pages"], 4),
                         "shift_topic_share": round(r["shift_items"] / r["items"], 4),
                         "utility_per_examined": round(z["utility"] / z["examined"], 4) if z.get("examined") else None,
                         "ctr": round(z["clicks"] / z["impressions"], 4) if z.get("impressions") else None,
                         "model_versions": len(r.get("model_versions", ()))})
    half = minutes / 2
    after = [x for x in timeline if x["t_min"] > half]
    before = [x for x in timeline if x["t_min"] <= half]

    def wmean(rows: list[dict], key: str) -> float | None:
        n = sum(x["pages"] for x in rows)
        return round(sum(x[key] * x["pages"] for x in rows) / n, 4) if n else None

    pages = np.array(rec.pages, dtype=np.float64).reshape(-1, 5)
    post = pages[pages[:, 0] >= minutes * 30_000]
    return {"arm": arm, "sessions": st.sessions,
            "after_shift_pages": {"n": int(post.shape[0]), "expected_utility_mean": _mean(post[:, 1]),
                                  "expected_utility_se": _se(post[:, 1]),
                                  "shift_expected_utility_mean": _mean(post[:, 2]),
                                  "shift_expected_utility_se": _se(post[:, 2]),
                                  "oracle_order_expected_utility_mean": _mean(post[:, 3]),
                                  "oracle_all_expected_utility_mean": _mean(post[:, 4]),
                                  "share_of_oracle_order": _ratio(post[:, 1], post[:, 3]),
                                  "share_of_oracle_all": _ratio(post[:, 1], post[:, 4])},
            "impressions": st.impressions, "errors": st.errors,
            "utility_per_examined": round(st.utility / max(st.examined, 1), 4), "ctr": round(st.ctr, 4),
            "before_shift": {"page_expected_utility": wmean(before, "page_expected_utility"),
                             "shift_expected_utility_per_page": wmean(before, "shift_expected_utility_per_page"),
                             "shift_topic_share": wmean(before, "shift_topic_share")},
            "after_shift": {"page_expected_utility": wmean(after, "page_expected_utility"),
                            "shift_expected_utility_per_page": wmean(after, "shift_expected_utility_per_page"),
                            "shift_topic_share": wmean(after, "shift_topic_share")},
            "timeline": timeline,
            "learner": {"decisions": {k: sum(d["decision"] == k for d in decisions)
                                      for k in ("promote", "reject", "rollback")},
                        "examples": learner.get("examples"), "log": decisions[-20:]} if learns else None}


def _mean(v: np.ndarray) -> float | None:
    return round(float(v.mean()), 4) if v.size else None


def _ratio(num: np.ndarray, den: np.ndarray) -> float | None:
    return round(float(num.mean() / den.mean()), 4) if num.size and den.mean() > 0 else None


def _se(v: np.ndarray) -> float | None:
    return round(float(v.std(ddof=1) / np.sqrt(v.size)), 4) if v.size > 1 else None


def run_trend_shift(cfg: Config, world_dir: Path, users: int = 300, minutes: float = 40.0, speed: float = 8.0,
                    seed: int = 0, topic: int | None = None, boost: float = 1.5, bucket_min: float = 4.0,
                    progress: Step | None = None, arms: tuple[str, ...] = tuple(ARMS)) -> dict[str, Any]:
    """``cfg`` is an isolated configuration whose stack is up (see :func:`lab.experiments.run_experiments`);
    ``arms`` names the :data:`ARMS` to run ("frozen" and "online" at least)."""
    step = progress or (lambda s, f: None)
    topic = int(cfg.sim.trend_shifts[0].topic) if topic is None and cfg.sim.trend_shifts else int(topic or 3)
    t0 = time.perf_counter()
    ran = {arm: run_arm(cfg, arm, world_dir, users, minutes, speed, seed, topic, boost, bucket_min, step)
           for arm in arms}
    on, off = ran["online"]["after_shift"], ran["frozen"]["after_shift"]
    res = {"protocol": "same users (seeded), same starting models and state; the truth shifts at the midpoint; "
                       "expected utility of served pages from the simulator's ground truth",
           "users": users, "simulated_minutes": minutes, "speed": speed, "topic": topic, "boost": boost,
           "shift_at_min": minutes / 2, "learner_settings": LEARNER,
           "arm_settings": {a: ARMS[a] for a in arms}, "arms": ran,
           "after_shift_online_minus_frozen": {k: round(on[k] - off[k], 4) for k in on if on[k] is not None
                                               and off[k] is not None},
           "seconds": round(time.perf_counter() - t0, 1)}
    # each learning arm against the frozen one: difference of the per-page means after the shift, with its
    # standard error (pages independent)
    pb = ran["frozen"]["after_shift_pages"]
    for arm in (a for a in arms if ARMS[a] is not None):
        pa = ran[arm]["after_shift_pages"]
        for key in ("expected_utility", "shift_expected_utility"):
            if pa[f"{key}_se"] is not None and pb[f"{key}_se"] is not None:
                d = pa[f"{key}_mean"] - pb[f"{key}_mean"]
                se = float(np.hypot(pa[f"{key}_se"], pb[f"{key}_se"]))
                name = f"after_shift_{key}_per_page_difference" + ("" if arm == "online" else f"_{arm}")
                res[name] = {f"{arm}_minus_frozen": round(d, 4), "se": round(se, 4), "z": round(d / se, 2) if se > 0 else None}
    res["checks"] = {"online_beats_frozen_after_shift": bool(
        (on["page_expected_utility"] or 0) > (off["page_expected_utility"] or 0))}
    return res


def plot(res: dict[str, Any], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    keys = [("page_expected_utility", "expected utility per page"),
            ("shift_expected_utility_per_page", f"... from topic {res['topic']}"),
            ("shift_topic_share", f"share of topic {res['topic']} served")]
    for ax, (k, title) in zip(axes, keys):
        for i, arm in enumerate(res["arms"]):
            tl = res["arms"][arm]["timeline"]
            ax.plot([x["t_min"] for x in tl], [x[k] for x in tl], "o-", ms=3, color=f"C{i}", label=arm)
        ax.axvline(res["shift_at_min"], color="k", ls="--", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("simulated minutes (dashed: shift)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    name = "trend_shift.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
