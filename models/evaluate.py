"""Offline evaluation against a ground truth (`feedrank eval --dataset sim`: the simulator's).

Retrieval: Recall@K of held-out clicked posts for the two-tower vs popularity (point-in-time
and training-window MostPop). Rankers: per-head AUC and calibration on the validation
window; NDCG@20 against the *true* utility on fresh candidate sets (follow-graph + recent
posts) for the heavy ranker (position-aware and position-blind), the light ranker and
random order. Position bias: the regression-EM estimate and the PAL tower's curve vs the
true examination curve. All figures are computed here, from this run. The truth is passed in
(:class:`GroundTruth`): only a simulated world knows it, and models never import the simulator.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from core.schema import HEAD_NAMES, LIGHT_FEATURES
from models.position_bias import regression_em
from models.sim_data import SimData
from core.units import DAY_MS, HOUR_MS

Progress = Callable[[str, float], None]


class GroundTruth(Protocol):
    """What only a simulated world knows: how good a post is for a user, and how likely a position
    is examined (:class:`sim.world.World` implements it)."""

    def true_utility(self, users: np.ndarray, posts: np.ndarray, t_ms: np.ndarray) -> np.ndarray: ...
    def examination_prob(self, positions: np.ndarray) -> np.ndarray: ...


def auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties averaged)."""
    y = np.asarray(y).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    ss = np.asarray(s)[order]
    # average ranks of ties
    _, first, counts = np.unique(ss, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def ndcg_at_k(scores: np.ndarray, gains: np.ndarray, k: int = 20) -> float:
    """NDCG@k of ordering by ``scores`` with non-negative ``gains``."""
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    top = np.argsort(-scores, kind="stable")[:k]
    ideal = np.sort(gains)[::-1][:k]
    idcg = float((ideal * disc[: ideal.size]).sum())
    return float((gains[top] * disc[: top.size]).sum() / idcg) if idcg > 0 else float("nan")


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict:
    edges = np.quantile(p, np.linspace(0, 1, bins + 1))
    b = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    cnt = np.bincount(b, minlength=bins)
    ok = cnt > 0
    return {"predicted": (np.bincount(b, weights=p, minlength=bins)[ok] / cnt[ok]).tolist(),
            "observed": (np.bincount(b, weights=y, minlength=bins)[ok] / cnt[ok]).tolist()}


# --------------------------------------------------------------------------- retrieval


def eval_retrieval(data: SimData, model, post_emb: np.ndarray, n: int = 3000, ks=(100, 500, 1000, 2000, 4000, 8000),
                   seed: int = 0) -> dict:
    w, imp, y = data.world, data.impressions, data.labels
    rows = data.sample_rows(~data.train_mask & (y[:, 0] > 0), n, seed)
    users, posts, t = imp["user_id"].to_numpy()[rows], imp["post_id"].to_numpy()[rows], imp["ts"].to_numpy()[rows]
    ue = data.user_embeddings(model, users, t)
    temp = float(model.config.get("temperature", 0.05))
    rec = float(model.recency.detach())
    kmax = min(max(ks), w.n_posts)
    rank_tt = np.zeros(rows.size, dtype=np.int64)
    for i in range(0, rows.size, 256):
        sl = slice(i, i + 256)
        s = ue[sl] @ post_emb.T / temp + rec * (w.post_ts[None, :] - t[sl, None]) / DAY_MS
        s[w.post_ts[None, :] > t[sl, None]] = -np.inf
        target = s[np.arange(s.shape[0]), posts[sl]]
        rank_tt[sl] = (s > target[:, None]).sum(1)
    # popularity at query time (clicks before t), recomputed per hour of queries
    rank_live = np.zeros(rows.size, dtype=np.int64)
    allp = np.arange(w.n_posts)
    tie = np.random.default_rng(seed).random(w.n_posts) * 1e-3
    for hr in np.unique(t // HOUR_MS):
        m = (t // HOUR_MS) == hr
        c = data.history.post["clicks"].before(allp, np.full(allp.size, hr * HOUR_MS)).astype(float)
        c[w.post_ts > hr * HOUR_MS] = -1
        c = c + tie  # ties broken at random, not by recency
        rank_live[m] = (c[None, :] > c[posts[m]][:, None]).sum(1)
    train_clicks = np.bincount(imp["post_id"].to_numpy()[data.train_mask & (y[:, 0] > 0)], minlength=w.n_posts)
    c = train_clicks + tie
    rank_pop = (c[None, :] > c[posts][:, None]).sum(1)
    curve = lambda r: {int(k): round(float((r < k).mean()), 4) for k in ks if k <= kmax}  # noqa: E731
    res = {"queries": int(rows.size), "corpus": int(w.n_posts), "two_tower": curve(rank_tt),
           "popularity_live": curve(rank_live), "popularity_train": curve(rank_pop)}
    k8 = max(k for k in ks if k <= kmax)
    res["ratio_vs_popularity_live@%d" % k8] = round(res["two_tower"][k8] / max(res["popularity_live"][k8], 1e-9), 2)
    res["ratio_vs_popularity_train@%d" % k8] = round(res["two_tower"][k8] / max(res["popularity_train"][k8], 1e-9), 2)
    return res


# --------------------------------------------------------------------------- rankers


def heavy_predict(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(model.relevance_logits(torch.from_numpy(x))).numpy()


def eval_heads(data: SimData, trained, valid: dict) -> dict:
    out = {}
    for name, m in (("heavy", trained.heavy), ("heavy_position_blind", trained.heavy_blind)):
        if m is None:
            continue
        p = heavy_predict(m, valid["x"])
        if m.position is not None:
            full = p * m.examination_curve(np.minimum(valid["position"], 64))[:, None]
        else:
            full = p
        out[name] = {"auc": {h: round(auc(valid["y"][:, j], p[:, j]), 4) for j, h in enumerate(HEAD_NAMES)},
                     # what the model predicts for the logged, position-biased outcome (PAL: exam x relevance)
                     "auc_observed": {h: round(auc(valid["y"][:, j], full[:, j]), 4) for j, h in enumerate(HEAD_NAMES)},
                     "calibration": {h: calibration(valid["y"][:, j], full[:, j]) for j, h in enumerate(HEAD_NAMES)}}
    if trained.light is not None:
        s = trained.light.score(valid["x"][:, : len(LIGHT_FEATURES)])
        out["light"] = {"auc": {"click": round(auc(valid["y"][:, 0], s), 4)}}
    return out


def candidate_sets(data: SimData, n_sessions: int, per_source: int = 100, seed: int = 1) -> list[tuple[int, int, np.ndarray]]:
    """(user, t, candidates): recent posts of followed authors + recent posts from anyone."""
    w, imp = data.world, data.impressions
    rng = np.random.default_rng(seed)
    rows = data.sample_rows(~data.train_mask, n_sessions * 3, seed)
    out = []
    seen = set()
    for r in rows:
        u, t = int(imp["user_id"].iat[r]), int(imp["ts"].iat[r])
        if u in seen:
            continue
        seen.add(u)
        recent = np.flatnonzero((w.post_ts <= t) & (w.post_ts > t - 2 * DAY_MS))
        fol = recent[w.follows(np.full(recent.size, u), w.post_author[recent])]
        a = rng.choice(fol, min(per_source, fol.size), replace=False) if fol.size else np.array([], dtype=np.int64)
        b = rng.choice(recent, min(per_source, recent.size), replace=False)
        out.append((u, t, np.unique(np.concatenate([a, b]))))
        if len(out) >= n_sessions:
            break
    return out


def eval_ndcg(data: SimData, trained, weights: np.ndarray, truth: GroundTruth, n_sessions: int = 400, k: int = 20,
              seed: int = 1) -> dict:
    sets = candidate_sets(data, n_sessions, seed=seed)
    users = np.concatenate([np.full(c.size, u) for u, _, c in sets])
    ts = np.concatenate([np.full(c.size, t) for _, t, c in sets])
    posts = np.concatenate([c for _, _, c in sets])
    sess_u = np.array([u for u, _, _ in sets])
    sess_t = np.array([t for _, t, _ in sets])
    ue_s = data.user_embeddings(trained.two_tower, sess_u, sess_t)
    ue = np.repeat(ue_s, [c.size for _, _, c in sets], axis=0)
    x = data.history.heavy_features(users, posts, ts, ue, trained.post_emb[posts])
    scores = {"random": np.random.default_rng(seed).random(posts.size)}
    if trained.light is not None:
        scores["light"] = trained.light.score(x[:, : len(LIGHT_FEATURES)])
    if trained.heavy is not None:
        scores["heavy"] = heavy_predict(trained.heavy, x) @ weights
    if trained.heavy_blind is not None:
        scores["heavy_position_blind"] = heavy_predict(trained.heavy_blind, x) @ weights
    util = truth.true_utility(users, posts, ts)
    gains = np.maximum(util, 0.0)
    bounds_ = np.cumsum([0] + [c.size for _, _, c in sets])
    res = {}
    for name, s in scores.items():
        vals = [ndcg_at_k(s[a:b], gains[a:b], k) for a, b in zip(bounds_[:-1], bounds_[1:])]
        res[name] = round(float(np.nanmean(vals)), 4)
    res["sessions"] = len(sets)
    res["mean_candidates"] = round(float(np.mean([c.size for _, _, c in sets])), 1)
    return res


def eval_position_bias(trained, train: dict, truth: GroundTruth, n_positions: int = 20,
                       progress: Progress | None = None) -> dict:
    from core.schema import HEAVY_NAMES, LOGGING_POLICY_FEATURES

    x = train["x"][:, [HEAVY_NAMES.index(c) for c in LOGGING_POLICY_FEATURES]]
    est = regression_em(train["position"], train["y"][:, 0], x, n_positions=n_positions,
                        progress=(lambda f: progress("position-bias EM", f)) if progress else None)
    exam = truth.examination_prob(np.arange(1, n_positions + 1))
    exam = exam / exam[0]
    rel = np.array(est["relative"])
    err = np.abs(rel[:10] - exam[:10]) / exam[:10]
    out = {"true": exam.round(4).tolist(), "regression_em": rel.round(4).tolist(),
           "naive_ctr": np.round(est["naive_ctr_curve"], 4).tolist(),
           "max_rel_error_pos1_10": round(float(err.max()), 4), "rel_error_pos1_10": err.round(4).tolist(),
           "em_iterations": est["iterations"], "em_converged": est["converged"],
           "conditioning": LOGGING_POLICY_FEATURES}
    if trained.heavy is not None and trained.heavy.position is not None:
        pal = trained.heavy.examination_curve(np.arange(1, n_positions + 1))
        out["pal_tower"] = (pal / pal[0]).round(4).tolist()
    return out


# --------------------------------------------------------------------------- report


def _save(fig, out: Path, name: str, files: list[str]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    files.append(name)


def plots(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    r = res["retrieval"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("two_tower", "popularity_live", "popularity_train"):
        ks = sorted(int(k) for k in r[name])
        ax.plot(ks, [r[name][k] for k in ks], "o-", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K of held-out clicks")
    ax.legend()
    _save(fig, out, "recall_at_k.png", files)

    heads = res["heads"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [n for n in ("heavy", "heavy_position_blind") if n in heads]
    for i, n in enumerate(names):
        ax.bar(np.arange(6) + i * 0.4, [heads[n]["auc"][h] for h in HEAD_NAMES], 0.4, label=n)
    ax.set_xticks(np.arange(6) + 0.2, HEAD_NAMES)
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("AUC (validation window)")
    ax.legend()
    _save(fig, out, "head_auc.png", files)

    fig, axes = plt.subplots(2, 3, figsize=(10, 6))
    for ax, h in zip(axes.ravel(), HEAD_NAMES):
        c = heads["heavy"]["calibration"][h]
        ax.plot(c["predicted"], c["observed"], "o-")
        m = max(max(c["predicted"]), max(c["observed"]))
        ax.plot([0, m], [0, m], "k--", lw=0.8)
        ax.set_title(h)
        ax.set_xlabel("predicted")
        ax.set_ylabel("observed")
    _save(fig, out, "calibration.png", files)

    pb = res["position_bias"]
    fig, ax = plt.subplots(figsize=(6, 4))
    pos = np.arange(1, len(pb["true"]) + 1)
    ax.plot(pos, pb["true"], "k-", lw=2, label="true (simulator)")
    ax.plot(pos, pb["regression_em"], "o-", label="regression-EM estimate")
    if "pal_tower" in pb:
        ax.plot(pos, pb["pal_tower"], "s-", label="PAL position tower")
    ax.plot(pos, pb["naive_ctr"], "x--", label="naive CTR curve")
    ax.set_xlabel("position")
    ax.set_ylabel("P(examined) relative to position 1")
    ax.legend()
    _save(fig, out, "position_bias.png", files)

    nd = res["ndcg"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [n for n in ("random", "light", "heavy_position_blind", "heavy") if n in nd]
    ax.bar(names, [nd[n] for n in names])
    ax.set_ylabel("NDCG@20 vs true utility")
    _save(fig, out, "ndcg.png", files)
    return files


def markdown(res: dict, files: list[str]) -> str:
    r, nd, pb = res["retrieval"], res["ndcg"], res["position_bias"]
    k8 = max(int(k) for k in r["two_tower"])
    lines = [
        "# feedrank offline evaluation (simulated world)", "",
        f"Data: `{res['window']['data_dir']}`; time-based split: train < {res['window']['train_to_ms']} ms <= valid. "
        f"Wall time {res['seconds']} s.", "",
        "## Retrieval", "",
        f"| Recall@{k8} | value |", "|---|---|",
        f"| two-tower | {r['two_tower'][k8]} |", f"| popularity at query time | {r['popularity_live'][k8]} |",
        f"| MostPop (training window) | {r['popularity_train'][k8]} |", "",
        f"Index: {res.get('index', {})}", "",
        "## Heads (validation AUC)", "",
        "| head | heavy (PAL) | heavy (position-blind) |", "|---|---|---|",
    ]
    for h in HEAD_NAMES:
        lines.append(f"| {h} | {res['heads']['heavy']['auc'][h]} | "
                     f"{res['heads'].get('heavy_position_blind', {}).get('auc', {}).get(h, '-')} |")
    lines += ["", f"Light ranker click AUC: {res['heads'].get('light', {}).get('auc', {}).get('click', '-')}", "",
              "## NDCG@20 vs true utility", "", "| ranking | NDCG@20 |", "|---|---|"]
    lines += [f"| {n} | {nd[n]} |" for n in ("heavy", "heavy_position_blind", "light", "random") if n in nd]
    lines += ["", "## Position bias", "", f"max relative error of the regression-EM curve at positions 1-10: "
              f"{pb['max_rel_error_pos1_10']}", ""]
    lines += [f"![{f}]({f})" for f in files]
    return "\n".join(lines) + "\n"


def evaluate_sim(cfg, data_dir: str, out_json: Path, truth: GroundTruth, trained=None, data: SimData | None = None,
                 extra: dict | None = None, progress: Progress | None = None, heavy_rows: int | None = None,
                 n_queries: int = 10_000, n_sessions: int = 400, n_valid: int = 100_000, store=None,
                 tt_epochs: int | None = None, heavy_epochs: int | None = None) -> dict:
    """Train (if not given) and evaluate everything; write JSON + markdown + PNGs."""
    from models.train import ranking_rows, train_all

    t0 = time.perf_counter()
    progress = progress or (lambda s, f: None)
    heavy_rows = heavy_rows or cfg.training.heavy_rows
    res: dict = {}
    if trained is None:
        out = train_all(cfg, data_dir, "all", progress=progress, with_blind=True, heavy_rows=heavy_rows, store=store,
                        tt_epochs=tt_epochs, heavy_epochs=heavy_epochs)
        trained, data = out["trained"], out["data"]
        res["training"] = {k: v for k, v in out.items() if k not in ("trained", "data")}
        if "retrieval" in res["training"]:
            res["index"] = {k: res["training"]["retrieval"][k] for k in ("k", "nlist", "nprobe", "recall", "mean_ms_per_query")}
    assert data is not None
    res["window"] = data.window
    progress("eval: retrieval", 0.0)
    res["retrieval"] = eval_retrieval(data, trained.two_tower, trained.post_emb, n=n_queries)
    progress("eval: heads", 0.0)
    valid = ranking_rows(data, trained.two_tower, trained.post_emb, data.sample_rows(~data.train_mask, n_valid, 2))
    res["heads"] = eval_heads(data, trained, valid)
    weights = np.array([cfg.heads.weights()[h] for h in HEAD_NAMES], dtype=np.float32)
    progress("eval: NDCG vs true utility", 0.0)
    res["ndcg"] = eval_ndcg(data, trained, weights, truth, n_sessions=n_sessions)
    progress("eval: position bias", 0.0)
    train = ranking_rows(data, trained.two_tower, trained.post_emb, data.sample_rows(data.train_mask, heavy_rows, 3))
    res["position_bias"] = eval_position_bias(trained, train, truth, progress=progress)
    res.update(extra or {})
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    files = plots(res, out_json.parent)
    out_json.write_text(json.dumps(res, indent=2))
    (out_json.parent / "report.md").write_text(markdown(res, files))
    return res


def write_ml100k_report(res: dict, out_json: Path) -> None:
    """JSON + markdown + a bar chart for the MovieLens-100K comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=2))
    names = ["popularity", "bpr_mf", "two_tower"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, metric in enumerate(("recall@10", "ndcg@10")):
        ax.bar(np.arange(3) + 0.4 * i, [res[n][metric] for n in names], 0.4, label=metric)
    ax.set_xticks(np.arange(3) + 0.2, names)
    ax.legend()
    ax.set_title("MovieLens-100K, leave-last-out, full ranking")
    fig.tight_layout()
    fig.savefig(out_json.parent / "ml100k.png", dpi=110)
    plt.close(fig)
    lines = ["# MovieLens-100K", "", res["protocol"], "", "| model | Recall@10 | NDCG@10 |", "|---|---|---|"]
    lines += [f"| {n} | {res[n]['recall@10']} | {res[n]['ndcg@10']} |" for n in names]
    lines += ["", "![ml100k](ml100k.png)", ""]
    (out_json.parent / "report.md").write_text("\n".join(lines))
