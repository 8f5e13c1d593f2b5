"""`feedrank experiments report`: each experiment's read-out from what serving logged.

From the lake's exposures (each carries the user's experiment -> variant assignments) and
engagements: per experiment and variant, the users, exposures, CTR, every head's engagement rate
(like, comment, share, long dwell, negative feedback) and the session depth (exposures per
session, sessions split at SESSION_GAP_MS), each with a 95% confidence interval and its
difference to the control variant (absolute and relative, with CI, p-value and the relative
effect the experiment could detect at 80% power). Every metric is a ratio over users (the unit of
assignment), so its variance comes from the delta method over per-user sums. A sample-ratio
mismatch check (chi-square of the users per variant against the configured weights) flags an
assignment or logging defect; guardrails configured per experiment (``guardrails = { metric =
bound }`` in experiments.toml: the largest relative change allowed, negative for metrics that must
not fall) are flagged when a significant change crosses them.

An engagement counts for the first exposure of its (user, post) in the window; a user belongs to the
variant their exposures name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config
from core.schema import NEGATIVE_ACTION_NAMES, SESSION_GAP_MS

from serving.ab_tests import READOUT_METRICS as METRICS
# metric -> (numerator, denominator) of per-user sums
RATIOS = {"ctr": ("click", "exposures"), "like_rate": ("like", "exposures"), "comment_rate": ("comment", "exposures"),
          "share_rate": ("share", "exposures"), "long_dwell_rate": ("long_dwell", "exposures"),
          "negative_rate": ("negative", "exposures"), "session_depth": ("exposures", "sessions")}
Z95, Z80 = 1.959964, 0.841621
SRM_P = 0.001  # a sample ratio this unlikely under the configured weights is a defect, not chance


def normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi2_sf(x: float, df: int) -> float:
    """P(chi-square with ``df`` degrees of freedom > x): the regularized upper incomplete gamma (torch's)."""
    import torch

    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64)))


@dataclass
class Ratio:
    """sum(y) / sum(n) over users, with its delta-method standard error."""
    value: float
    se: float
    users: int

    @classmethod
    def of(cls, y: np.ndarray, n: np.ndarray) -> "Ratio":
        k = y.size
        if k == 0 or n.sum() == 0:
            return cls(float("nan"), float("nan"), k)
        r = y.sum() / n.sum()
        if k < 2:
            return cls(float(r), float("nan"), k)
        nbar = n.mean()
        var = (np.var(y, ddof=1) - 2 * r * np.cov(y, n, ddof=1)[0, 1] + r * r * np.var(n, ddof=1)) / (k * nbar * nbar)
        return cls(float(r), float(math.sqrt(max(var, 0.0))), k)

    def ci(self) -> list[float]:
        return [self.value - Z95 * self.se, self.value + Z95 * self.se]


def per_user(exposures: Any, engagements: Any, long_dwell_ms: int) -> Any:
    """One row per (user, variant assignments): exposures, sessions and the head counts of the exposed posts."""
    import pandas as pd

    ex = exposures.sort_values("ts", kind="stable")
    first = ex.drop_duplicates(["user_id", "post_id"])[["user_id", "post_id", "ts"]]
    en = engagements.merge(first, on=["user_id", "post_id"], suffixes=("", "_exposed"))
    en = en[en["ts"] >= en["ts_exposed"]]
    labels = pd.DataFrame({"user_id": en["user_id"], "post_id": en["post_id"],
                           "click": en["action"] == "click", "like": en["action"] == "like",
                           "comment": en["action"] == "comment", "share": en["action"] == "share",
                           "long_dwell": (en["action"] == "dwell") & (en["dwell_ms"].fillna(0) >= long_dwell_ms),
                           "negative": en["action"].isin(NEGATIVE_ACTION_NAMES)})
    heads = ["click", "like", "comment", "share", "long_dwell", "negative"]
    pairs = labels.groupby(["user_id", "post_id"], sort=False)[heads].any()  # each (user, post) labelled once
    counts = pairs.groupby(level="user_id")[heads].sum()
    gaps = ex.groupby("user_id")["ts"].diff()
    ex = ex.assign(new_session=gaps.isna() | (gaps > SESSION_GAP_MS))
    users = ex.groupby("user_id").agg(exposures=("post_id", "size"), sessions=("new_session", "sum"),
                                      experiments=("experiments", "last"))
    return users.join(counts, how="left").fillna({h: 0 for h in heads})


def _compare(v: Ratio, c: Ratio) -> dict[str, Any]:
    diff, se = v.value - c.value, math.hypot(v.se, c.se)
    rel = v.value / c.value - 1 if c.value else float("nan")
    se_rel = math.sqrt((v.se / c.value) ** 2 + (v.value * c.se / c.value ** 2) ** 2) if c.value else float("nan")
    p = 2 * normal_sf(abs(diff) / se) if se > 0 else float("nan")
    return {"diff": diff, "diff_ci": [diff - Z95 * se, diff + Z95 * se], "relative": rel,
            "relative_ci": [rel - Z95 * se_rel, rel + Z95 * se_rel], "p_value": p, "significant": bool(p < 0.05),
            "mde_relative_80_power": (Z95 + Z80) * se / c.value if c.value else float("nan")}


def _window(t: Any, since_ms: int | None, until_ms: int | None) -> Any:
    ts = t["ts"].to_numpy()
    keep = np.ones(len(t), dtype=bool)
    if since_ms is not None:
        keep &= ts >= since_ms
    if until_ms is not None:
        keep &= ts < until_ms
    return t[keep]


def report(cfg: Config, experiments_file: Path | None = None, since_ms: int | None = None,
           until_ms: int | None = None) -> dict[str, Any]:
    """The read-out of every experiment in ``experiments_file`` (default serving.experiments_file) that the
    logged exposures in [since_ms, until_ms) name."""
    from features.lake import read_table
    from serving.ab_tests import Experiments

    exps = Experiments.load(experiments_file or cfg.path(cfg.serving.experiments_file))
    ex = read_table(cfg, "exposures", columns=["ts", "user_id", "post_id", "experiments"]).to_pandas()
    en = read_table(cfg, "engagements", columns=["ts", "user_id", "post_id", "action", "dwell_ms"]).to_pandas()
    ex, en = _window(ex, since_ms, until_ms), _window(en, since_ms, None)  # engagements may follow the window
    users = per_user(ex, en, cfg.heads.long_dwell_ms) if len(ex) else None
    out: dict[str, Any] = {"window": {"since_ms": since_ms, "until_ms": until_ms,
                                      "first_exposure_ms": int(ex["ts"].min()) if len(ex) else None,
                                      "last_exposure_ms": int(ex["ts"].max()) if len(ex) else None},
                           "exposures": int(len(ex)), "engagements": int(len(en)), "experiments": []}
    for e in exps.experiments:
        if users is None:
            break
        variant = users["experiments"].map(lambda s: json.loads(s or "{}").get(e.name))
        in_exp = users[variant.notna()].assign(variant=variant[variant.notna()])
        if in_exp.empty:
            continue
        names = [v.name for v in e.variants]
        control = "control" if "control" in names else names[0]
        variants: dict[str, Any] = {}
        ratios: dict[str, dict[str, Ratio]] = {}
        for v in names:
            g = in_exp[in_exp["variant"] == v]
            ratios[v] = {m: Ratio.of(g[num].to_numpy(float), g[den].to_numpy(float)) for m, (num, den) in RATIOS.items()}
            variants[v] = {"users": int(len(g)), "exposures": int(g["exposures"].sum()),
                           "metrics": {m: {"value": r.value, "se": r.se, "ci": r.ci()} for m, r in ratios[v].items()}}
        for v in names:
            if v != control:
                variants[v]["vs_control"] = {m: _compare(ratios[v][m], ratios[control][m]) for m in METRICS}
        total_w = sum(v.weight for v in e.variants)
        n = sum(variants[v]["users"] for v in names)
        expected = [n * v.weight / total_w for v in e.variants]
        chi2 = sum((variants[v.name]["users"] - x) ** 2 / x for v, x in zip(e.variants, expected) if x > 0)
        srm_p = chi2_sf(chi2, len(names) - 1) if len(names) > 1 else 1.0
        breaches = []
        for metric, bound in e.guardrails.items():
            for v in names:
                if v == control:
                    continue
                c = variants[v]["vs_control"][metric]
                crossed = c["relative"] > bound if bound >= 0 else c["relative"] < bound
                if crossed and c["significant"]:
                    breaches.append({"variant": v, "metric": metric, "bound": bound, "relative": c["relative"],
                                     "p_value": c["p_value"]})
        out["experiments"].append({
            "name": e.name, "control": control, "variants": variants,
            "srm": {"chi2": chi2, "p_value": srm_p, "mismatch": bool(srm_p < SRM_P),
                    "expected_share": {v.name: v.weight / total_w for v in e.variants}},
            "guardrails": dict(e.guardrails), "guardrail_breaches": breaches})
    return out


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{x:+.1%}"


def markdown(rep: dict[str, Any]) -> str:
    lines = ["# Experiment read-out", "", f"{rep['exposures']:,} exposures, {rep['engagements']:,} engagements "
             f"(exposures {rep['window']['first_exposure_ms']} .. {rep['window']['last_exposure_ms']} ms).", ""]
    for e in rep["experiments"]:
        srm = e["srm"]
        lines += [f"## {e['name']}", "",
                  f"Sample ratio: chi-square {srm['chi2']:.2f}, p = {srm['p_value']:.3g} "
                  + ("— **MISMATCH: the assignment or the logging is broken; do not trust the rest**" if srm["mismatch"]
                     else "(no mismatch)"), ""]
        head = "| variant | users | exposures | " + " | ".join(METRICS) + " |"
        lines += [head, "|" + "---|" * (3 + len(METRICS))]
        for v, d in e["variants"].items():
            cells = []
            for m in METRICS:
                val = d["metrics"][m]["value"]
                cell = f"{val:.4f}" if m != "session_depth" else f"{val:.2f}"
                if "vs_control" in d:
                    c = d["vs_control"][m]
                    cell += f" ({_pct(c['relative'])} [{_pct(c['relative_ci'][0])}, {_pct(c['relative_ci'][1])}]" \
                            + (", **p=%.2g**)" % c["p_value"] if c["significant"] else ", p=%.2g)" % c["p_value"])
                cells.append(cell)
            lines.append(f"| {v}{' (control)' if v == e['control'] and v != 'control' else ''} | {d['users']:,} | {d['exposures']:,} | "
                         + " | ".join(cells) + " |")
        lines.append("")
        if e["guardrails"]:
            lines.append("Guardrails: " + ", ".join(f"{m} {b:+.0%}" for m, b in e["guardrails"].items()) + ". "
                         + ("**Breached**: " + "; ".join(f"{b['variant']} {b['metric']} {_pct(b['relative'])}"
                                                         for b in e["guardrail_breaches"])
                            if e["guardrail_breaches"] else "none breached."))
            lines.append("")
    return "\n".join(lines)


def plot(rep: dict[str, Any], path: Path) -> Path:
    """Each variant's relative difference to control per metric, with its 95% CI (one panel per experiment)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = [e for e in rep["experiments"] if len(e["variants"]) > 1]
    fig, axes = plt.subplots(max(len(exps), 1), 1, figsize=(9, 3.2 * max(len(exps), 1)), squeeze=False)
    for ax, e in zip(axes[:, 0], exps):
        others = [v for v in e["variants"] if v != e["control"]]
        width = 0.8 / max(len(others), 1)
        for j, v in enumerate(others):
            c = e["variants"][v]["vs_control"]
            x = np.arange(len(METRICS)) + j * width
            rel = np.array([c[m]["relative"] for m in METRICS]) * 100
            lo = rel - np.array([c[m]["relative_ci"][0] for m in METRICS]) * 100
            hi = np.array([c[m]["relative_ci"][1] for m in METRICS]) * 100 - rel
            ax.bar(x, rel, width, yerr=[lo, hi], capsize=3, label=v)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(METRICS)) + width * (len(others) - 1) / 2, METRICS, fontsize=8)
        ax.set_ylabel("vs control, %")
        ax.set_title(f"{e['name']} (95% CI)" + ("  SAMPLE RATIO MISMATCH" if e["srm"]["mismatch"] else ""))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(rep: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "png": out_dir / "report.png"}
    paths["json"].write_text(json.dumps(rep, indent=2))
    paths["md"].write_text(markdown(rep) + f"\n![relative differences](report.png)\n")
    plot(rep, paths["png"])
    return paths
