"""`feedrank eval experiments`: feed variants compared on the simulator's ground truth.

Every variant serves the *same* simulated users (same seeds) over the *same* simulated
window, starting from the same state; only the feed differs. The FeedService variants
run the real server in-process on an isolated stack, with its clock driven by the
simulation's clock (sessions run instantly), and are called over gRPC like any client.

    V0_chronological          EdgeRank-style: followed authors' recent posts by affinity x type x decay
    V1_follow_graph_rankers   follow-graph candidates only, then light + heavy rankers and the re-ranker
    V2_full_funnel            follow graph + ANN + trending (+ ads) -> light -> heavy -> re-ranker
    V2_without_light_ranker   the heavy ranker scores every candidate (light_k = all)
    V2_without_reranker       ranked by score alone: no diversity, out-of-network, freshness or ad rules

Measured per variant: realised true utility (per examined item and total), CTR, the
expected utility of each served page (examination-weighted true utility, "page DCG"),
NDCG@20 of each page's order vs its true-utility order, discovery share (items from
authors the user does not follow) and diversity (distinct authors per page).

Also here: position-bias corrected vs naive training (:mod:`lab.position_bias_experiment`)
online learning on vs off after a trend shift (:mod:`lab.trend_shift_experiment`) and rankers retrained from
FeedService's own logs (the lake) vs the logging-policy tables (:mod:`lab.lake_retraining_experiment`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from core.config import Config
from lab.variants import VARIANTS, run_variant

Step = Callable[[str, float], None]

PARTS = ("variants", "position_bias", "trend_shift", "lake_retraining")


def run_experiments(cfg: Config, world_dir: Path, out_json: Path, users: int = 300, minutes: float = 60.0,
                    seed: int = 0, variants: tuple[str, ...] = VARIANTS, progress: Step | None = None,
                    parts: tuple[str, ...] = PARTS, trend_minutes: float = 40.0, speed: float = 8.0,
                    options: dict[str, dict[str, Any]] | None = None) -> dict:
    """Every comparison on one isolated stack; one JSON, one markdown report, a plot per comparison.
    ``options`` passes keyword arguments to a part (e.g. fewer seeds or training rows in tests)."""
    options = options or {}
    from features.feast_repo import apply, export
    from runtime import stack
    from lab.bench import isolated_config, machine

    step = progress or (lambda s, f: None)
    bcfg = isolated_config(cfg, "experiments")
    t0 = time.monotonic()
    stack.up(bcfg)
    res: dict[str, Any] = {"world": str(world_dir), "users": users, "simulated_minutes": minutes, "seed": seed,
                           "machine": machine(), "parts": list(parts)}
    try:
        step("Feast export of the world", 0.0)
        apply(bcfg)
        export(bcfg, world_dir)
        if "variants" in parts:
            results = []
            for i, v in enumerate(variants):
                step(f"variant {v}", i / len(variants))
                results.append(run_variant(bcfg, v, world_dir, users, minutes, seed))
            step("variants", 1.0)
            res["variants"] = {r["variant"]: r for r in results}
            res["protocol"] = ("same users (seeded), same simulated window and starting state per variant; true "
                               "utility from the simulator's ground truth at serve time")
        if "position_bias" in parts:
            from lab.position_bias_experiment import run_position_bias

            res["position_bias"] = run_position_bias(bcfg, world_dir, users, minutes, seed, progress=step,
                                                     **options.get("position_bias", {}))
        if "trend_shift" in parts:
            from lab.trend_shift_experiment import run_trend_shift

            res["trend_shift"] = run_trend_shift(bcfg, world_dir, users, trend_minutes, speed, seed, progress=step,
                                                 **options.get("trend_shift", {}))
        if "lake_retraining" in parts:
            from lab.lake_retraining_experiment import run_lake_retraining

            res["lake_retraining"] = run_lake_retraining(bcfg, world_dir, users, minutes, seed, progress=step,
                                                         **options.get("lake_retraining", {}))
    finally:
        stack.down(bcfg)
    checks: dict[str, bool] = {}
    v = res.get("variants", {})
    if {"V0_chronological", "V1_follow_graph_rankers", "V2_full_funnel"} <= set(v):
        # total: all true utility the same users got in the same window (the feed's job); per examined
        # item: its quality per item looked at. Both are reported; neither is hidden when it fails.
        for key, label in (("utility_total", "total_utility"), ("utility_per_examined", "utility_per_examined")):
            for other, short in (("V1_follow_graph_rankers", "V1"), ("V0_chronological", "V0")):
                checks[f"V2_beats_{short}_on_{label}"] = v["V2_full_funnel"][key] > v[other][key]
    for part in ("position_bias", "trend_shift"):
        checks.update(res.get(part, {}).get("checks", {}))
    res["checks"] = checks
    res["wall_seconds"] = round(time.monotonic() - t0, 1)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=2))
    _report(res, out_json.parent)
    return res


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _report(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# feedrank experiments on the simulator's ground truth", "",
             f"World `{res['world']}`, {res['users']} simulated users, seed {res['seed']}; machine: "
             f"{res['machine']['cpus']} cores, {res['machine']['memory_gb']} GB"
             + (f"; {res['wall_seconds'] / 60:.1f} minutes wall time." if "wall_seconds" in res else "."), ""]
    v = res.get("variants")
    if v:
        names = list(v)
        metrics = ["utility_total", "utility_per_examined", "ctr", "page_expected_utility", "ndcg@20_vs_true_utility",
                   "discovery_share"]
        fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
        for ax, m in zip(axes.ravel(), metrics):
            ax.bar(range(len(names)), [v[n][m] for n in names], color=[f"C{i}" for i in range(len(names))])
            ax.set_title(m, fontsize=9)
            ax.set_xticks(range(len(names)), [n.replace("_", "\n", 1) for n in names], fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "experiments.png", dpi=110)
        plt.close(fig)
        lines += ["## Feed variants and ablations", "", res["protocol"] + f"; {res['simulated_minutes']:g} simulated "
                  "minutes each.", "",
                  "| variant | total utility | utility / examined | examined | CTR | page expected utility "
                  "(share of oracle order / of oracle over all posts) | "
                  "NDCG@20 vs true utility | discovery | distinct authors / item | sessions |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for n in names:
            r = v[n]
            lines.append(f"| {n} | {r['utility_total']} | {r['utility_per_examined']} | {r['examined']} | {r['ctr']} | "
                         f"{r['page_expected_utility']} ({_pct(r.get('share_of_oracle_order'))} / "
                         f"{_pct(r.get('share_of_oracle_all'))}) | "
                         f"{r['ndcg@20_vs_true_utility']} | {r['discovery_share']} | {r['distinct_authors_per_item']} | "
                         f"{r['sessions']} |")
        lines += ["", "Oracle ceilings (simulator ground truth, the same pages' positions): the served items in the "
                  "best order, and the best posts of the whole corpus for the user at that moment (published, "
                  "not flagged, not already served): lab/oracle.py.", "", "![experiments](experiments.png)", ""]
    pb = res.get("position_bias")
    if pb:
        from lab.position_bias_experiment import plot as pb_plot

        name = pb_plot(pb, out)
        o = pb["offline_ndcg@20"]
        lines += ["## Position bias: corrected (PAL) vs naive training", "", pb["protocol"] + ".", "",
                  "| | corrected | naive |", "|---|---|---|",
                  f"| offline NDCG@20, mean of seeds {pb['seeds']} | {o['corrected']['mean']} | {o['naive']['mean']} |",
                  f"| offline NDCG@20 per seed | {o['corrected']['per_seed']} | {o['naive']['per_seed']} |"]
        if "online" in pb:
            on = pb["online"]
            for k in ("ndcg@20_vs_true_utility", "utility_per_examined", "page_expected_utility", "ctr"):
                lines.append(f"| served: {k} | {on['corrected'][k]} | {on['naive'][k]} |")
            for k in ("share_of_oracle_order", "share_of_oracle_all"):
                lines.append(f"| served: page expected utility as a {k.replace('_', ' ')} | "
                             f"{_pct(on['corrected'].get(k))} | {_pct(on['naive'].get(k))} |")
        d = pb["offline_corrected_minus_naive"]
        lines += ["", f"Corrected beats naive offline in {d['seeds_corrected_better']} of {d['of']} seeds "
                  f"(mean difference {d['mean']:+}).", "", f"![position bias]({name})", ""]
    ts = res.get("trend_shift")
    if ts:
        from lab.trend_shift_experiment import plot as ts_plot

        name = ts_plot(ts, out)
        a = ts["arms"]
        names = list(a)
        lines += ["## Trend shift: online learning on vs off", "", ts["protocol"] + f". {ts['users']} users, "
                  f"{ts['simulated_minutes']:g} simulated minutes at {ts['speed']:g}x real time; topic {ts['topic']} "
                  f"gets +{ts['boost']} on the engagement logit at minute {ts['shift_at_min']:g}. Arms' learner "
                  f"settings over feedrank.toml's: {ts.get('arm_settings', {})}.", "",
                  "| after the shift | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for k in ("page_expected_utility", "shift_expected_utility_per_page", "shift_topic_share"):
            lines.append(f"| {k} | " + " | ".join(str(a[n]['after_shift'][k]) for n in names) + " |")
        lines += ["| utility per examined (whole window) | " + " | ".join(str(a[n]['utility_per_examined']) for n in names) + " |"]
        for k in ("share_of_oracle_order", "share_of_oracle_all"):
            lines.append(f"| page expected utility as a {k.replace('_', ' ')} | "
                         + " | ".join(_pct(a[n]['after_shift_pages'].get(k)) for n in names) + " |")
        lines.append("")
        for arm in (n for n in names if a[n].get("learner") is not None):
            for key in ("expected_utility", "shift_expected_utility"):
                d = ts.get(f"after_shift_{key}_per_page_difference" + ("" if arm == "online" else f"_{arm}"))
                if d:
                    lines.append(f"After the shift, {key} per page: {arm} minus frozen {d[f'{arm}_minus_frozen']:+} "
                                 f"(standard error {d['se']}, z = {d['z']}).")
            lines.append(f"Learner decisions ({arm}): {a[arm]['learner']['decisions']}, "
                         f"{a[arm]['learner']['examples']} examples.")
        lines += ["", f"![trend shift]({name})", ""]
    lr = res.get("lake_retraining")
    if lr:
        from lab.lake_retraining_experiment import ARMS as LR_ARMS, plot as lr_plot

        name = lr_plot(lr, out)
        c, col, ts_ = lr["lake_retrained_minus_logging_policy"], lr["collection"], lr["training_set"]
        lines += ["## Rankers retrained from FeedService's own logs vs the logging-policy tables", "",
                  lr["protocol"] + ".", "",
                  f"Collected: {col['users']} users (seed {col['seed']}), {col['simulated_minutes']:g} simulated minutes, "
                  f"{col['served']['served']:,} exposures served and {col['lake_exposures']:,} in the lake; training set "
                  f"{ts_['splits']['train']['rows']:,} train / {ts_['splits']['validation']['rows']:,} validation rows "
                  f"({ts_['counts']['examples_positive']:,} positives). Evaluated: {lr['users']} users (seed {lr['seed']}), "
                  f"{lr['simulated_minutes']:g} simulated minutes per arm.", "",
                  "| metric | logging policy | lake retrained | difference (SE) | z |", "|---|---|---|---|---|"]
        for m, r in c.items():
            if isinstance(r, dict):
                lines.append(f"| {m} | {r[LR_ARMS[0]]} ± {r['se'][LR_ARMS[0]]} | {r[LR_ARMS[1]]} ± {r['se'][LR_ARMS[1]]} | "
                             f"{r['difference']:+} ({r['difference_se']}) | {r['z']} |")
        lines += ["", "Page expected utility as a share of the oracle order / of the oracle over all eligible posts: "
                  + "; ".join(f"{arm} {_pct(lr['arms'][arm].get('share_of_oracle_order'))} / "
                              f"{_pct(lr['arms'][arm].get('share_of_oracle_all'))}" for arm in LR_ARMS) + ".",
                  "", f"![lake retraining]({name})", ""]
    lines += ["## Checks", "", *[f"- {k}: **{'yes' if ok else 'no'}**" for k, ok in res["checks"].items()], ""]
    (out / "report.md").write_text("\n".join(lines))
