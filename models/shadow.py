"""Shadow scoring before promotion: a candidate heavy ranker scores live HOME pages beside the model that
serves them; after ``shadow.window_s`` it is promoted only if its ranking quality on the engagements that
followed is at least the serving model's, within tolerances.

Control lives in Redis (``SHADOW_KEY``: which candidate, since when, against which serving version), so
every serving replica shadows the same candidate; serving logs both models' scores per page
(``shadow_scored`` events, archived by the lake job as ``shadow_scores``). :func:`evaluate` reads the lake:
labels per head from the engagements attributed to each served item (:func:`features.lake.attribute`,
``lake.attribution_window_s``), then per head the AUC of each model's P(head), and per page the NDCG@k of
each model's weighted order against position-corrected outcomes (clicks over the serving model's
examination probability at their position). Every decision is logged, kept in ``DECISIONS`` and counted in
``DECISION_COUNTS`` (serving exports the counts as ``feedrank_shadow_decisions``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np

from core.config import Config
from core.schema import HEAD_NAMES, head_labels

log = logging.getLogger("feedrank.models.shadow")
SHADOW_KEY = "feedrank:shadow:heavy"
DECISIONS = "feedrank:shadow:decisions"
DECISION_COUNTS = "feedrank:shadow:decision_counts"


class ShadowError(ValueError):
    """A shadow command that cannot be carried out (unknown version, already current, none running)."""


def _redis(cfg: Config) -> Any:
    from features.connection import redis_client

    return redis_client(cfg)


def active(cfg: Config) -> dict[str, Any] | None:
    raw = _redis(cfg).hgetall(SHADOW_KEY)
    if not raw:
        return None
    d = {k.decode(): v.decode() for k, v in raw.items()}
    d["started_ms"] = int(d["started_ms"])
    return d


def start(cfg: Config, store: Any, version: str, now_ms: int | None = None) -> dict[str, Any]:
    """Shadow ``version`` of the heavy ranker from now on (replacing any running shadow)."""
    if version not in store.versions("heavy"):
        raise ShadowError(f"heavy has no version {version!r} (feedrank models list)")
    current = store.current("heavy")
    if version == current:
        raise ShadowError(f"{version} is already the current heavy model")
    d = {"version": version, "started_ms": str(now_ms if now_ms is not None else int(time.time() * 1000)),
         "serving_at_start": current or ""}
    _redis(cfg).hset(SHADOW_KEY, mapping=d)
    log.info("shadow start: heavy %s beside %s", version, current)
    return active(cfg) or {}


def stop(cfg: Config) -> dict[str, Any] | None:
    was = active(cfg)
    _redis(cfg).delete(SHADOW_KEY)
    return was


def _pages(cfg: Config, candidate: str, since_ms: int, until_ms: int) -> list[dict]:
    from features.lake import read_table

    t = read_table(cfg, "shadow_scores", _dates(since_ms, until_ms))
    return [r for r in t.to_pylist() if r["candidate_version"] == candidate and since_ms <= r["ts"] <= until_ms]


def _dates(since_ms: int, until_ms: int) -> list[str]:
    from features.lake import partition

    out, t = [], since_ms
    while True:
        d = partition(t)[0]
        if d not in out:
            out.append(d)
        if t >= until_ms:
            break
        t = min(until_ms, t + 86_400_000)
    return out


def evaluate(cfg: Config, candidate: str, since_ms: int, until_ms: int | None = None,
             examination: np.ndarray | None = None) -> dict[str, Any]:
    """The candidate vs the serving model on the pages both scored since ``since_ms``."""
    from features.lake import attribute, read_table
    from models.evaluate import auc, ndcg_at_k

    until_ms = until_ms if until_ms is not None else int(time.time() * 1000)
    pages = _pages(cfg, candidate, since_ms, until_ms)
    window_ms = int(cfg.lake.attribution_window_s * 1000)
    eng_dates = _dates(since_ms, until_ms + window_ms)
    engs: dict[tuple[int, int], list[dict]] = {}
    for e in read_table(cfg, "engagements", eng_dates).to_pylist():
        if e["ts"] >= since_ms:
            engs.setdefault((e["user_id"], e["post_id"]), []).append(e)
    items: dict[tuple[int, int], list[dict]] = {}  # (user, post) -> its served items in these pages
    cur_rows, cand_rows, positions, page_of = [], [], [], []
    for pi, pg in enumerate(pages):
        n = len(pg["post_ids"])
        cur = np.frombuffer(pg["current"], dtype="<f4").reshape(n, len(HEAD_NAMES))
        cand = np.frombuffer(pg["candidate"], dtype="<f4").reshape(n, len(HEAD_NAMES))
        for i, (p, pos) in enumerate(zip(pg["post_ids"], pg["positions"])):
            items.setdefault((pg["user_id"], p), []).append(
                {"ts": pg["ts"], "request_id": pg["request_id"], "row": len(cur_rows)})
            cur_rows.append(cur[i])
            cand_rows.append(cand[i])
            positions.append(pos)
            page_of.append(pi)
    y = np.zeros((len(cur_rows), len(HEAD_NAMES)), dtype=np.float32)
    for key, exps in items.items():
        exps.sort(key=lambda r: r["ts"])
        for r, got in zip(exps, attribute(exps, engs.get(key, []), window_ms)):
            y[r["row"]] = head_labels(got, cfg.heads.long_dwell_ms)
    cur_p = np.array(cur_rows, dtype=np.float32).reshape(-1, len(HEAD_NAMES))
    cand_p = np.array(cand_rows, dtype=np.float32).reshape(-1, len(HEAD_NAMES))
    heads: dict[str, Any] = {}
    for j, h in enumerate(HEAD_NAMES):
        pos_n = int(y[:, j].sum())
        if pos_n < cfg.shadow.min_positives or pos_n == len(y):
            heads[h] = {"positives": pos_n, "compared": False}
            continue
        a_cur, a_cand = auc(y[:, j], cur_p[:, j]), auc(y[:, j], cand_p[:, j])
        heads[h] = {"positives": pos_n, "compared": True, "auc_current": round(a_cur, 4), "auc_candidate": round(a_cand, 4)}
    w = np.array([cfg.heads.weights()[h] for h in HEAD_NAMES], dtype=np.float32)
    pos_arr = np.asarray(positions, dtype=np.int64)
    exam = _examination(examination, pos_arr)
    gains = y[:, 0] / exam  # clicks, position-corrected
    page_arr = np.asarray(page_of, dtype=np.int64)
    nd_cur, nd_cand = [], []
    for pi in range(len(pages)):
        rows = np.flatnonzero(page_arr == pi)
        if rows.size < 2 or gains[rows].sum() <= 0:
            continue
        nd_cur.append(ndcg_at_k(cur_p[rows] @ w, gains[rows], cfg.shadow.ndcg_k))
        nd_cand.append(ndcg_at_k(cand_p[rows] @ w, gains[rows], cfg.shadow.ndcg_k))
    diff = np.array(nd_cand) - np.array(nd_cur)
    ndcg = {"pages": len(diff),
            "current": round(float(np.mean(nd_cur)), 4) if nd_cur else None,
            "candidate": round(float(np.mean(nd_cand)), 4) if nd_cand else None,
            "difference": round(float(diff.mean()), 4) if diff.size else None,
            "difference_se": round(float(diff.std(ddof=1) / math.sqrt(diff.size)), 4) if diff.size > 1 else None}
    return {"candidate": candidate, "since_ms": since_ms, "until_ms": until_ms, "pages": len(pages),
            "items": len(cur_rows), "heads": heads, "ndcg": ndcg,
            "serving_versions": sorted({p["current_version"] for p in pages})}


def _examination(curve: np.ndarray | None, positions: np.ndarray) -> np.ndarray:
    """P(examined | position) relative to position 1 (the serving model's learned curve), floored at 0.05."""
    if curve is None or not len(curve):
        return np.ones(positions.size, dtype=np.float32)
    c = np.asarray(curve, dtype=np.float32)
    return np.maximum(c[np.minimum(positions, c.size) - 1], 0.05)


def verdict(cfg: Config, ev: dict[str, Any], elapsed_s: float) -> tuple[str, list[str]]:
    """('waiting' | 'promote' | 'reject', reasons) for an evaluation after ``elapsed_s`` of shadowing."""
    S = cfg.shadow
    if elapsed_s < S.window_s or ev["pages"] < S.min_pages:
        return "waiting", [f"{elapsed_s:.0f} of {S.window_s} s, {ev['pages']} of {S.min_pages} pages"]
    reasons, ok = [], True
    for h, r in ev["heads"].items():
        if not r["compared"]:
            continue
        if r["auc_candidate"] < r["auc_current"] - S.auc_tolerance:
            ok = False
            reasons.append(f"{h} AUC {r['auc_candidate']} < {r['auc_current']} - {S.auc_tolerance}")
    if not any(r["compared"] for r in ev["heads"].values()):
        return "waiting", [f"no head has {S.min_positives} positive labels yet"]
    nd = ev["ndcg"]
    if nd["pages"] and nd["candidate"] < nd["current"] - S.ndcg_tolerance:
        ok = False
        reasons.append(f"NDCG@{S.ndcg_k} {nd['candidate']} < {nd['current']} - {S.ndcg_tolerance}")
    return ("promote", ["every compared head's AUC and the NDCG within tolerance"]) if ok else ("reject", reasons)


def status(cfg: Config, store: Any, decide: bool = True, now_ms: int | None = None) -> dict[str, Any]:
    """Evaluate the running shadow; once its window is over, promote or reject it (and stop shadowing)."""
    sh = active(cfg)
    if sh is None:
        raise ShadowError("no shadow is running (feedrank models shadow start VERSION)")
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    ck = store.meta("heavy", store.current("heavy")) if store.current("heavy") else None
    curve = np.asarray((ck.extra or {}).get("examination_curve", []), dtype=np.float32) if ck is not None else None
    ev = evaluate(cfg, sh["version"], sh["started_ms"], now_ms, curve)
    decision, reasons = verdict(cfg, ev, (now_ms - sh["started_ms"]) / 1000)
    out = {**ev, "decision": decision, "reasons": reasons, "shadow": sh}
    if decide and decision != "waiting":
        if decision == "promote":
            store.promote("heavy", sh["version"])
        stop(cfg)
        r = _redis(cfg)
        r.rpush(DECISIONS, json.dumps({k: v for k, v in out.items() if k != "shadow"} | {"at_ms": now_ms}, default=str))
        r.hincrby(DECISION_COUNTS, decision, 1)
        log.info("shadow %s: heavy %s (%s)", decision, sh["version"], "; ".join(reasons))
    return out
