"""Rankers retrained from FeedService's own logs vs rankers trained on the logging-policy tables.

The production rankers are fitted to the simulator's history, which an EdgeRank-style policy served
(``models/train.py`` on ``sim.world``). Here the loop runs on feedrank's own data instead:

    1. collect   the FeedService (full funnel, production models) serves ``collect_users`` simulated
                 users for ``collect_minutes``; the lake job (``feedrank jobs run lake``, a child process)
                 archives the exposures, the served feature rows and the engagements as they happen
    2. build     the Beam training set over the lake's dates (``jobs.training_set``: attribution,
                 labels per head, served rows, 1:N negatives with weights)
    3. retrain   light and heavy rankers from that set (``models.lake_training``) into a copy of the
                 model store; the two-tower and everything else stay as they were
    4. serve     both model sets to the *same* simulated users (same seed) over the *same* simulated
                 window, from the same starting state: ``logging_policy`` and ``lake_retrained``

The collection population uses another seed than the evaluation one, so the evaluated sessions were
never logged. Standard errors: per user (sessions of one user are not independent) for utility per
examined item, CTR and total utility — a paired bootstrap over the users both arms served — and per
page for the page-level means (expected utility, discovery share, NDCG).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.config import Config

Step = Callable[[str, float], None]
ARMS = ("logging_policy", "lake_retrained")
USER_METRICS = ("utility_per_examined", "ctr", "utility_total")
PAGE_METRICS = (("page_expected_utility", "expected_utility"), ("discovery_share", "discovery"),
                ("ndcg@20_vs_true_utility", "ndcg"))


def _date(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")


def collect(cfg: Config, world_dir: Path, root: Path, users: int, minutes: float, seed: int, step: Step,
            timeout_s: float = 900.0) -> dict[str, Any]:
    """Serve ``users`` for ``minutes`` with the lake job archiving the stream; returns once every
    exposure served is committed to the lake (``cfg`` carries the lake and event log of this run)."""
    from features import lake
    from lab.trend_shift_experiment import wait_progress
    from lab.variants import run_variant
    from runtime.procs import ProcessGroup, child_env
    from sim.world import World

    (root / "log").mkdir(parents=True, exist_ok=True)
    procs = ProcessGroup(root / "log")
    exe = str(Path(sys.executable).parent / "feedrank")
    try:
        step("collect: starting the lake job", 0.0)
        procs.start("lake-job", [exe, "jobs", "run", "lake"], child_env(cfg))
        wait_progress(cfg, {"lake": "opened"}, procs)
        step(f"collect: FeedService serving {users} users for {minutes:g} simulated minutes", 0.1)
        served = run_variant(cfg, "V2_full_funnel", world_dir, users, minutes, seed)
        start = World.load(world_dir).end_ms
        dates = sorted({_date(start), _date(start + int(minutes * 60_000))})
        t0 = time.monotonic()
        while True:
            procs.check()
            n = lake.read_table(cfg, "exposures", dates, columns=["event_id"]).num_rows
            step(f"collect: {n:,} of {served['served']:,} exposures committed to the lake", 0.5 + 0.5 * n / max(served["served"], 1))
            if n >= served["served"]:
                break
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"the lake holds {n} of the {served['served']} exposures served after {timeout_s:.0f} s "
                                   f"(lake job log: {root / 'log' / 'lake-job.log'})")
            time.sleep(2.0)
    finally:
        procs.stop()
    return {"users": users, "simulated_minutes": minutes, "seed": seed, "dates": dates,
            "served": {k: served[k] for k in ("sessions", "served", "impressions", "examined", "ctr", "utility_total",
                                              "utility_per_examined", "errors", "seconds")},
            "lake_exposures": n, "lake_commit_wait_s": round(time.monotonic() - t0, 1)}


def _ratio(rows: np.ndarray, num: int, den: int) -> float:
    d = rows[:, den].sum()
    return float(rows[:, num].sum() / d) if d else float("nan")


def _user_metric(rows: np.ndarray, metric: str) -> float:
    """rows: [sessions, impressions, examined, clicks, utility] per user."""
    if metric == "utility_per_examined":
        return _ratio(rows, 4, 2)
    if metric == "ctr":
        return _ratio(rows, 3, 1)
    return float(rows[:, 4].sum())


def compare(a: dict[str, Any], b: dict[str, Any], boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """``b`` minus ``a`` per metric with standard errors (see the module docstring)."""
    users = sorted(set(a["_per_user"]) | set(b["_per_user"]))
    ra = np.array([a["_per_user"].get(u, [0.0] * 5) for u in users], dtype=np.float64)
    rb = np.array([b["_per_user"].get(u, [0.0] * 5) for u in users], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(users), size=(boot, len(users)))
    out: dict[str, Any] = {"users": len(users)}
    for m in USER_METRICS:
        va, vb = _user_metric(ra, m), _user_metric(rb, m)
        bs_a = np.array([_user_metric(ra[i], m) for i in idx])
        bs_b = np.array([_user_metric(rb[i], m) for i in idx])
        se_d = float(np.nanstd(bs_b - bs_a, ddof=1))
        out[m] = {ARMS[0]: round(va, 4), ARMS[1]: round(vb, 4),
                  "se": {ARMS[0]: round(float(np.nanstd(bs_a, ddof=1)), 4), ARMS[1]: round(float(np.nanstd(bs_b, ddof=1)), 4)},
                  "difference": round(vb - va, 4), "difference_se": round(se_d, 4),
                  "z": round((vb - va) / se_d, 2) if se_d > 0 else None}
    for m, key in PAGE_METRICS:
        pa = np.array([p[key] for p in a["_pages"]], dtype=np.float64)
        pb = np.array([p[key] for p in b["_pages"]], dtype=np.float64)
        pa, pb = pa[~np.isnan(pa)], pb[~np.isnan(pb)]
        sa, sb = pa.std(ddof=1) / np.sqrt(pa.size), pb.std(ddof=1) / np.sqrt(pb.size)
        d, se = float(pb.mean() - pa.mean()), float(np.hypot(sa, sb))
        out[m] = {ARMS[0]: round(float(pa.mean()), 4), ARMS[1]: round(float(pb.mean()), 4),
                  "se": {ARMS[0]: round(float(sa), 4), ARMS[1]: round(float(sb), 4)}, "pages": [int(pa.size), int(pb.size)],
                  "difference": round(d, 4), "difference_se": round(se, 4), "z": round(d / se, 2) if se > 0 else None}
    return out


def run_lake_retraining(cfg: Config, world_dir: Path, users: int = 300, minutes: float = 60.0, seed: int = 0,
                        collect_users: int | None = None, collect_minutes: float | None = None,
                        epochs: int | None = None, progress: Step | None = None) -> dict[str, Any]:
    """``cfg`` is an isolated configuration whose stack is up (see :func:`lab.experiments.run_experiments`).
    The collection defaults to twice the evaluation's users over the same number of minutes."""
    from jobs import training_set
    from lab.variants import run_variant
    from models.lake_training import train_from_lake
    from models.store import ModelStore

    step = progress or (lambda s, f: None)
    t0 = time.perf_counter()
    root = cfg.data_dir / "lake-retraining"
    ccfg = cfg.model_copy(update={
        "lake": cfg.lake.model_copy(update={"uri": "file://" + str(root / "lake")}),
        "events": cfg.events.model_copy(update={"uri": "file://" + str(root / "events")})})
    col = collect(ccfg, world_dir, root, collect_users or 2 * users, collect_minutes or minutes, seed + 1000, step)
    step("training set from the lake (Beam)", 0.0)
    last = col["dates"][-1]
    days = (datetime.fromisoformat(last) - datetime.fromisoformat(col["dates"][0])).days + 1
    meta = training_set.run(ccfg, last, days)
    set_dir = training_set.out_dir(ccfg, last, days)
    step("retraining the light and heavy rankers from the lake", 0.0)
    source = ModelStore.from_config(cfg)
    store = ModelStore("file://" + str(root / "models"), cache_dir=root / "model-cache")
    source.copy_current(store)
    trained = train_from_lake(ccfg, "both", set_dir, store=store, epochs=epochs)
    served: dict[str, dict[str, Any]] = {}
    for i, arm in enumerate(ARMS):
        step(f"serving the {arm} rankers", i / len(ARMS))
        acfg = cfg if arm == "logging_policy" else cfg.model_copy(
            update={"model_store": cfg.model_store.model_copy(update={"uri": store.uri})})
        served[arm] = run_variant(acfg, "V2_full_funnel", world_dir, users, minutes, seed, detail=True)
    cmp = compare(served["logging_policy"], served["lake_retrained"], seed=seed)
    return {
        "protocol": ("collect: the FeedService (production rankers, full funnel) serves a population of another seed "
                     "while the lake job archives the stream; a Beam training set over those days; light + heavy "
                     "retrained from it; then both rankers served to the same simulated users (same seed) over the "
                     "same simulated window from the same starting state. SE: paired bootstrap over users for the "
                     "per-user metrics, per page for page means"),
        "users": users, "simulated_minutes": minutes, "seed": seed, "collection": col,
        "training_set": {"dir": str(set_dir), "counts": meta["counts"], "splits": meta["splits"],
                         "seconds": meta["seconds"], "negatives_per_positive": meta["negatives_per_positive"]},
        "retrained": {k: v for k, v in trained.items() if k in ("light", "heavy", "train_rows", "validation_rows")},
        "arms": {arm: {k: v for k, v in r.items() if not k.startswith("_")} for arm, r in served.items()},
        "lake_retrained_minus_logging_policy": cmp,
        "seconds": round(time.perf_counter() - t0, 1)}


def plot(res: dict[str, Any], out: Path) -> str:
    """Each metric per arm with its standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmp = res["lake_retrained_minus_logging_policy"]
    metrics = [m for m in (*USER_METRICS, *(k for k, _ in PAGE_METRICS)) if m in cmp]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.4))
    for ax, m in zip(axes, metrics):
        vals = [cmp[m][a] for a in ARMS]
        ax.bar(range(len(ARMS)), vals, yerr=[cmp[m]["se"][a] for a in ARMS], capsize=4, color=["C0", "C1"])
        ax.set_xticks(range(len(ARMS)), ["logging\npolicy", "lake\nretrained"], fontsize=8)
        lo = min(v - 3 * cmp[m]["se"][a] for v, a in zip(vals, ARMS))
        ax.set_ylim(max(0.0, lo) if lo > 0 else lo, max(vals) * 1.05 if max(vals) > 0 else 0.0)
        ax.set_title(f"{m}\nz = {cmp[m]['z']}", fontsize=8)
    fig.tight_layout()
    name = "lake_retraining.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
