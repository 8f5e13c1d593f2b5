"""Position-bias experiment: the heavy ranker trained position-corrected (PAL) vs naive.

Both arms train on the *same* logged impressions (same rows, same seed, same epochs); only
the treatment of the logged position differs:

    corrected   PAL: a position tower explains P(examined | position) during training;
                serving uses the position-free relevance (what `feedrank train heavy` publishes)
    naive       the same model without the position tower: logged clicks are taken at face
                value, so top-of-feed items look better than they are

Measured, against the simulator's ground truth:

* offline, per training seed: NDCG@20 of each model's ranking of held-out candidate sets
  (followed authors' and anyone's recent posts, after the training window) vs true utility;
* online, for the first seed: each model published into its own copy of the model store
  and served by the real FeedService (full funnel) to the same simulated users over the
  same simulated window: NDCG@20 of every served page vs true utility, realised utility.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.config import Config

Step = Callable[[str, float], None]
ARMS = ("corrected", "naive")


def run_position_bias(cfg: Config, world_dir: Path, users: int, minutes: float, seed: int = 0,
                      seeds: tuple[int, ...] = (0, 1, 2), heavy_rows: int = 200_000, epochs: int = 3,
                      n_sessions: int = 400, online: bool = True, progress: Step | None = None) -> dict[str, Any]:
    """``cfg`` is an isolated configuration whose stack is up (see :func:`lab.experiments.run_experiments`)."""
    from core.schema import HEAD_NAMES
    from models.evaluate import eval_ndcg
    from models.sim_data import SimData
    from sim.world import World
    from models.store import ModelStore
    from models.train import Trained, fit_heavy, load_two_tower, publish_heavy, ranking_rows
    from lab.variants import run_variant

    step = progress or (lambda s, f: None)
    t0 = time.perf_counter()
    data = SimData.load(str(world_dir))
    world = World.load(world_dir)  # the ground truth the offline NDCG is measured against
    source = ModelStore.from_config(cfg)
    two_tower, post_emb = load_two_tower(source, data)
    weights = np.array([cfg.heads.weights()[h] for h in HEAD_NAMES], dtype=np.float32)
    offline: dict[str, list[float]] = {a: [] for a in ARMS}
    first: dict[str, Any] = {}
    for i, s in enumerate(seeds):
        step(f"position bias: training seed {s}", i / len(seeds))
        train = ranking_rows(data, two_tower, post_emb, data.sample_rows(data.train_mask, heavy_rows, s))
        for arm in ARMS:
            model, _ = fit_heavy(train, position_aware=(arm == "corrected"), epochs=epochs, seed=s,
                                 feature_clip=cfg.training.heavy_feature_clip)
            trained = Trained(two_tower=two_tower, post_emb=post_emb, heavy=model)
            offline[arm].append(eval_ndcg(data, trained, weights, world, n_sessions=n_sessions)["heavy"])
            if i == 0:
                first[arm] = model
    diffs = np.array(offline["corrected"]) - np.array(offline["naive"])
    res: dict[str, Any] = {
        "protocol": "same training rows, seed and epochs per arm; offline NDCG@20 vs true utility on held-out "
                    "candidate sets; online: each arm served by the FeedService to the same simulated users",
        "training_rows": heavy_rows, "epochs": epochs, "seeds": list(seeds),
        "offline_ndcg@20": {a: {"per_seed": [round(v, 4) for v in offline[a]], "mean": round(float(np.mean(offline[a])), 4)}
                            for a in ARMS},
        "offline_corrected_minus_naive": {"mean": round(float(diffs.mean()), 4),
                                          "seeds_corrected_better": int((diffs > 0).sum()), "of": len(seeds)}}
    if online:
        res["online"] = {}
        for j, arm in enumerate(ARMS):
            step(f"position bias: serving the {arm} model", j / len(ARMS))
            store = ModelStore("file://" + str(cfg.data_dir / f"models-{arm}"), cache_dir=cfg.data_dir / "model-cache")
            source.copy_current(store)
            publish_heavy(cfg, store, first[arm], data.window, {"experiment": "position_bias", "arm": arm})
            acfg = cfg.model_copy(update={"model_store": cfg.model_store.model_copy(update={"uri": store.uri})})
            res["online"][arm] = run_variant(acfg, "V2_full_funnel", world_dir, users, minutes, seed)
        on = res["online"]
        res["online_corrected_minus_naive"] = {
            k: round(on["corrected"][k] - on["naive"][k], 4)
            for k in ("ndcg@20_vs_true_utility", "utility_per_examined", "page_expected_utility", "ctr")}
    res["checks"] = {"corrected_beats_naive_on_offline_ndcg": bool(diffs.mean() > 0)}
    if online:
        res["checks"]["corrected_beats_naive_on_served_ndcg"] = bool(res["online_corrected_minus_naive"]["ndcg@20_vs_true_utility"] > 0)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def plot(res: dict[str, Any], out: Path) -> str:
    """Offline NDCG per seed and served-page NDCG per arm, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if "online" in res else 1, figsize=(10 if "online" in res else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    for i, arm in enumerate(ARMS):
        v = res["offline_ndcg@20"][arm]["per_seed"]
        ax.plot(range(len(v)), v, "o-", color=f"C{i}", label=arm)
    ax.set_xticks(range(len(res["seeds"])), [f"seed {s}" for s in res["seeds"]])
    ax.set_ylabel("NDCG@20 vs true utility")
    ax.set_title("offline (held-out candidate sets)", fontsize=9)
    ax.legend(fontsize=8)
    if "online" in res:
        ax = axes[0][1]
        vals = [res["online"][a]["ndcg@20_vs_true_utility"] for a in ARMS]
        ax.bar(range(len(ARMS)), vals, color=["C0", "C1"])
        ax.set_xticks(range(len(ARMS)), list(ARMS))
        ax.set_ylim(min(vals) * 0.95, max(vals) * 1.02)
        ax.set_title("served pages (FeedService, same users)", fontsize=9)
    fig.tight_layout()
    name = "position_bias.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
