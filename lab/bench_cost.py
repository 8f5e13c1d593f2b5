"""`feedrank bench cost`: how the cost of a GetFeed grows with the corpus and with the candidates.

One `feedrank bench serve` run per world scale whose world exists (small 50K, medium 200K, large 1M
posts) at one offered load low enough not to queue, then, on the largest world, one run per ANN
candidate count. Each point is the server's CPU per answered request (user + system time of its
processes over the level, background work included), GetFeed latency p50 / p99, the per-stage p50s
and the candidates per request. One JSON (every run's full result inside) and a PNG of the curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from core.config import Config

Step = Callable[[str, float], None]
SCALES = ("small", "medium", "large")


def _point(res: dict[str, Any], **extra: Any) -> dict[str, Any]:
    lv = res["levels"][0]
    cands = lv["candidates_per_request"]
    return {**extra, "posts": res["posts"], "offered_rps": lv["offered_rps"],
            "cpu_ms_per_request": lv["server_cpu_ms_per_request"],
            "p50_ms": lv["latency_ms"]["p50"], "p99_ms": lv["latency_ms"]["p99"],
            "candidates_per_request": round(sum(v for k, v in cands.items() if "follow_cache_miss" not in k), 1),
            "ann_candidates_per_request": cands.get('{source="AnnSource"}', 0.0),
            "degraded": lv["degraded"], "served_share": lv["served_share"], "server_rss_mb": lv["server_rss_mb"],
            "stages_p50_ms": {k: v.get("p50_ms") for k, v in lv["stages"].items()}}


def bench_cost(cfg: Config, rps: float = 10.0, seconds: float = 20.0, ann_k: tuple[int, ...] = (2000, 4000, 8000),
               progress: Step | None = None) -> dict[str, Any]:
    from lab.bench_serve import bench_serve

    step = progress or (lambda s, f: None)
    worlds = [(s, cfg.data_dir / "sim" / f"{s}-{cfg.sim.seed}") for s in SCALES]
    worlds = [(s, d) for s, d in worlds if (d / "ground_truth.npz").exists()]
    if not worlds:
        raise RuntimeError(f"no simulated world under {cfg.data_dir / 'sim'}: run `feedrank sim generate` first")
    runs: dict[str, Any] = {}
    by_posts = []
    for scale, d in worlds:
        step(f"{scale}: {rps:g} RPS", 0.0)
        res = bench_serve(cfg, scale, (rps,), seconds, progress=progress, world_dir=d)
        runs[scale] = res
        by_posts.append(_point(res, scale=scale, ann_k=cfg.candidates.ann_k))
        step(f"{scale}: {rps:g} RPS", 1.0)
    largest, d = worlds[-1]
    by_k = []
    for k in ann_k:
        if k == cfg.candidates.ann_k:
            by_k.append({**by_posts[-1]})
            continue
        step(f"{largest}, ann_k {k}", 0.0)
        res = bench_serve(cfg, largest, (rps,), seconds, progress=progress, world_dir=d,
                          overrides={"FEEDRANK_CANDIDATES_ANN_K": str(k)})
        runs[f"{largest}-ann_k-{k}"] = res
        by_k.append(_point(res, scale=largest, ann_k=k))
        step(f"{largest}, ann_k {k}", 1.0)
    by_k.sort(key=lambda p: p["ann_k"])
    return {"offered_rps": rps, "seconds": seconds, "by_posts": by_posts, "by_ann_k": by_k, "runs": runs}


def plot_cost(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, points, x, label in ((axes[0], res["by_posts"], "posts", "posts in the corpus"),
                                 (axes[1], res["by_ann_k"], "candidates_per_request", "candidates per request")):
        xs = [p[x] for p in points]
        for key, name, style in (("cpu_ms_per_request", "server CPU ms / request", "o-"),
                                 ("p50_ms", "GetFeed p50 ms", "s--"), ("p99_ms", "GetFeed p99 ms", "^:")):
            ax.plot(xs, [p[key] for p in points], style, label=name)
        if x == "posts":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(f"cost vs corpus (ANN k {res['by_posts'][-1]['ann_k']})", fontsize=10)
    axes[1].set_title(f"cost vs candidates ({res['by_ann_k'][-1]['posts']:,} posts)", fontsize=10)
    fig.suptitle(f"GetFeed at {res['offered_rps']:g} RPS, open loop, 2 workers", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
