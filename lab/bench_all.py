"""`feedrank bench` (no sub-command): every benchmark in one run, one summary.

Runs, each on its own isolated stack: (a) GetFeed latency over gRPC vs load at each scale
whose world exists (small always; large = 1M posts when generated), (b) retrieval recall@8000
and latency over the largest world, the rankers, (c) feature-job throughput and freshness,
(d) event -> promoted-model-serving delay. Each result is written as JSON + markdown in
bench/results/ as the single benches do; ``summary-<stamp>.md`` (+ PNG) quotes the headline
figures of exactly this run, with the machine.
"""

from __future__ import annotations

import json
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from core.config import PROJECT_ROOT, Config

Step = Callable[[str, float], None]


def run_all(cfg: Config, rps: tuple[float, ...] = (20.0, 50.0, 100.0, 150.0), seconds: float = 30.0,
            scales: tuple[str, ...] = ("small", "large"), progress: Step | None = None,
            out_dir: Path | None = None) -> tuple[Path, dict[str, Any]]:
    from lab import bench
    from lab.bench_model_delay import bench_model_delay
    from lab.bench_serve import bench_serve

    step = progress or (lambda s, f: None)
    out_dir = out_dir or PROJECT_ROOT / "bench" / "results"
    worlds = {s: cfg.data_dir / "sim" / f"{s}-{cfg.sim.seed}" for s in scales}
    worlds = {s: d for s, d in worlds.items() if (d / "ground_truth.npz").exists()}
    if not worlds:
        raise RuntimeError(f"no simulated world under {cfg.data_dir / 'sim'}: run `feedrank sim generate` first")
    small = worlds.get("small") or next(iter(worlds.values()))
    largest = worlds.get("large") or small
    runs: list[tuple[str, Callable[[], dict]]] = [
        *[(f"serve-{s}", (lambda s=s, d=d: bench_serve(cfg, s, rps, seconds, progress=step, world_dir=d)))
          for s, d in worlds.items()],
        ("retrieval", lambda: bench.bench_retrieval(cfg, largest, progress=step)),
        ("rankers", lambda: bench.bench_rankers(cfg)),
        ("features", lambda: bench.bench_features(cfg, progress=step, events="kafka")),
        ("freshness", lambda: bench.bench_freshness(cfg, progress=step, events="kafka")),
        ("model-delay", lambda: bench_model_delay(cfg, small, progress=step)),
    ]
    results: dict[str, Any] = {}
    paths: dict[str, str] = {}
    for name, fn in runs:
        t0 = time.perf_counter()
        try:
            with bench.scratch_removed_on_success():
                res = fn()
        except Exception as e:  # noqa: BLE001 - one failed bench is reported; the others still run
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=5)}
            continue
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        paths[name] = str(bench.write_result(name, res, out_dir))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    summary = {"at": stamp, "machine": bench.machine(), "results": paths,
               "errors": {k: v["error"] for k, v in results.items() if "error" in v}}
    path = out_dir / f"summary-{stamp}.md"
    png = plot(results, out_dir / f"summary-{stamp}.png")
    path.write_text(markdown(summary, results, png))
    (out_dir / f"summary-{stamp}.json").write_text(json.dumps({**summary, "headline": headline(results)}, indent=2))
    return path, results


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The figures people compare, picked from the full results (nothing computed here)."""
    out: dict[str, Any] = {}
    for name, r in results.items():
        if "error" in r:
            continue
        if name.startswith("serve-"):
            out[name] = {"posts": r.get("posts"), **{
                f"{lv['offered_rps']:g} rps": {"p50_ms": lv["latency_ms"]["p50"], "p99_ms": lv["latency_ms"]["p99"],
                                              "requests": lv["requests"], "codes": lv["codes"],
                                              "server_rss_mb": lv.get("server_rss_mb")}
                for lv in r.get("levels", [])}}
        elif name == "retrieval":
            out[name] = {k: r.get(k) for k in ("posts", "k", "recall_vs_exact", "latency_ms")}
        elif name == "features":
            out[name] = {k: r.get(k) for k in ("events_per_s", "post_operator_events_per_s_10_90")}
        elif name == "freshness":
            out[name] = r.get("serving_cache")
        elif name == "model-delay":
            out[name] = {k: r.get(k) for k in ("decisions", "exposure_to_serving_s", "published_to_serving_s")}
        elif name == "rankers":
            out[name] = {k: r.get(k) for k in ("light", "heavy")}
    return out


def markdown(summary: dict[str, Any], results: dict[str, Any], png: str | None) -> str:
    m = summary["machine"]
    lines = [f"# feedrank bench ({summary['at']})", "",
             f"Machine: {m['cpus']} cores, {m['memory_gb']} GB, {m['platform']}, Python {m['python']}.", "",
             "Command: `feedrank bench` (each figure below is measured in this run; full JSON beside each line).", ""]
    for name, fig in headline(results).items():
        lines += [f"## {name}", "", f"`{Path(summary['results'][name]).name}`", ""]
        if name.startswith("serve-"):
            lines += [f"{fig['posts']:,} posts. Latency of requests answered OK; shed = RESOURCE_EXHAUSTED.", "",
                      "| offered load | p50 ms | p99 ms | requests | answered OK | shed | server RSS MB |",
                      "|---|---|---|---|---|---|---|"]
            for level, v in fig.items():
                if level != "posts":
                    lines.append(f"| {level} | {v['p50_ms']} | {v['p99_ms']} | {v['requests']} | "
                                 f"{v['codes'].get('OK', 0)} | {v['codes'].get('RESOURCE_EXHAUSTED', 0)} | "
                                 f"{v['server_rss_mb']} |")
            lines.append("")
        else:
            lines += ["```json", json.dumps(fig), "```", ""]
    for name, err in summary["errors"].items():
        lines += [f"## {name}: FAILED", "", f"    {err}", ""]
    if png:
        lines += [f"![GetFeed latency vs load]({png})", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> str | None:
    serve = {k: v for k, v in results.items() if k.startswith("serve-") and "error" not in v}
    if not serve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (name, r) in enumerate(serve.items()):
        lv = r.get("levels", [])
        x = [v["offered_rps"] for v in lv]
        ax.plot(x, [v["latency_ms"]["p50"] for v in lv], "o--", color=f"C{i}", label=f"{name} p50")
        ax.plot(x, [v["latency_ms"]["p99"] for v in lv], "o-", color=f"C{i}", label=f"{name} p99")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("GetFeed latency over gRPC (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
