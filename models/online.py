"""Online learning of the heavy ranker's final layer, with guardrails (numpy only).

The learner sees labelled examples — the tower outputs and normalised features of a
served feature vector (computed once: only the final layers move), the six head labels observed within the
attribution window, the position it was shown at, the user and the model version that
served it — and does:

* **Position-bias correction (PAL)**: the training likelihood of a head is
  ``P(examined | position) * sigmoid(w.h + v.z + b)`` with the examination curve learned
  offline by the position tower; the gradient flows into ``w, v, b`` only, so the
  relevance score serving uses stays position-free.
* **Guardrails**: step size ``min(lr, lr_cap)``; the gradient's global norm clipped to
  ``grad_clip``; features clipped to +- ``training.heavy_feature_clip`` standard deviations of the
  training statistics, by the model's own transform (:meth:`NumpyHeavy.normalized`, the same as
  serving's); users whose
  hash falls in ``holdout_fraction`` are never trained on and form the holdout.
* **Validation**: a candidate is promoted only if its holdout click AUC is at least
  ``(1 - max_auc_drop)`` x the current model's — and x the offline model's the job started
  from, so small drops cannot ratchet — and its holdout log loss of the observed click is at
  most ``(1 + max_logloss_increase)`` x the current's (ranking can survive an attack that
  wrecks calibration: on a label-inverted stream AUC fell ~0.3% per interval while log loss
  rose sharply); on at least ``min_holdout`` examples with ``min_holdout_positives``
  clicks. Every decision carries its numbers.
* **Rollback**: live CTR per serving model version over ``rollback_window_s`` of event
  time; when the current version's CTR falls more than ``rollback_ctr_drop`` below its
  predecessor's (each with ``rollback_min_exposures``), the job rolls back.
"""

from __future__ import annotations

import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.schema import HEAD_NAMES
from core.units import MINUTE_MS
from models.inference import NumpyHeavy

CLICK = HEAD_NAMES.index("click")


def in_holdout(user_id: int, fraction: float) -> bool:
    """Stable across processes and restarts (crc32, not Python's salted hash)."""
    return zlib.crc32(str(int(user_id)).encode()) % 10_000 < int(fraction * 10_000)


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC with ties averaged (rank statistic); NaN without both classes."""
    y = np.asarray(y) > 0.5
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):  # average ranks of ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i: j + 1] = (i + j) / 2.0 + 1
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


@dataclass
class Example:
    h: np.ndarray          # [heads, 32] tower outputs for the served feature vector (deep input)
    z: np.ndarray          # [F] its normalised, clipped features (wide input)
    y: np.ndarray          # [heads] labels
    position: int
    user_id: int
    ts: int                # exposure event time, ms
    model_version: str
    x: np.ndarray | None = None  # [F] the served feature row itself: h and z again under another model


@dataclass
class LiveCtr:
    """Exposures and clicks per (model version, event-time minute)."""

    window_ms: int
    counts: dict[str, dict[int, list[int]]] = field(default_factory=dict)

    def add(self, version: str, ts: int, clicked: bool) -> None:
        b = self.counts.setdefault(version, {}).setdefault(ts // MINUTE_MS, [0, 0])
        b[0] += 1
        b[1] += int(clicked)

    def ctr(self, version: str, now_ms: int) -> tuple[int, float]:
        lo = (now_ms - self.window_ms) // MINUTE_MS
        buckets = self.counts.get(version, {})
        for m in [m for m in buckets if m < lo - 1]:
            del buckets[m]
        n = sum(v[0] for m, v in buckets.items() if m >= lo)
        c = sum(v[1] for m, v in buckets.items() if m >= lo)
        return n, (c / n if n else float("nan"))


class OnlineLearner:
    def __init__(self, ol: Any, base: NumpyHeavy, version: str):
        self._paired = np.zeros(0)
        self.ol = ol
        self.lr = min(ol.lr, ol.lr_cap)
        self.frozen = base                      # what the job started from (reported, never trained)
        self.current, self.current_version = base, version
        self.w, self.b, self.wide = base.final_w.copy(), base.final_b.copy(), base.wide.copy()
        self.batch: list[Example] = []
        self.holdout: deque[Example] = deque()
        self.train_recent: deque[tuple[int, int]] = deque()  # (ts, clicked) of training examples, same window
        self.live = LiveCtr(int(ol.rollback_window_s * 1000))
        self.steps = 0
        self.steps_since_promotion = 0
        self.trained = 0
        self.last_grad_norm = 0.0
        self.clipped_steps = 0

    # ------------------------------------------------------------------ data
    def add(self, ex: Example) -> None:
        self.live.add(ex.model_version, ex.ts, bool(ex.y[CLICK]))
        if in_holdout(ex.user_id, self.ol.holdout_fraction):
            self.holdout.append(ex)
            horizon = ex.ts - int(self.ol.holdout_window_s * 1000)
            while self.holdout and self.holdout[0].ts < horizon:
                self.holdout.popleft()
            return
        self.train_recent.append((ex.ts, int(ex.y[CLICK] > 0)))
        horizon = ex.ts - int(self.ol.holdout_window_s * 1000)
        while self.train_recent and self.train_recent[0][0] < horizon:
            self.train_recent.popleft()
        self.batch.append(ex)
        if len(self.batch) >= self.ol.batch_size:
            self.step(self.batch)
            self.batch = []

    # ------------------------------------------------------------------ SGD
    def step(self, batch: list[Example]) -> float:
        """One clipped SGD step of the PAL likelihood on the final layer; returns the loss."""
        h = np.stack([e.h for e in batch])                       # [n, H, d]
        zf = np.stack([e.z for e in batch]).astype(np.float64)  # [n, F]
        y = np.stack([e.y for e in batch]).astype(np.float64)   # [n, H]
        exam = self.current.examination(np.array([e.position for e in batch]))[:, None]  # [n, 1]
        z = np.einsum("nhd,hd->nh", h, self.w) + zf @ self.wide.T + self.b
        rel = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
        p = np.clip(exam * rel, 1e-6, 1 - 1e-6)
        loss = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
        # d(-log-lik)/dz for p = e * sigmoid(z)
        dz = ((p - y) / (p * (1 - p))) * exam * rel * (1 - rel) / len(batch)   # [n, H]
        gw = np.einsum("nh,nhd->hd", dz, h)
        gwide = dz.T @ zf
        gb = dz.sum(0)
        norm = float(np.sqrt((gw ** 2).sum() + (gwide ** 2).sum() + (gb ** 2).sum()))
        self.last_grad_norm = norm
        scale = 1.0
        if norm > self.ol.grad_clip:
            scale = self.ol.grad_clip / norm
            self.clipped_steps += 1
        self.w -= self.lr * scale * gw
        self.wide -= self.lr * scale * gwide
        self.b -= self.lr * scale * gb
        self.steps += 1
        self.steps_since_promotion += 1
        self.trained += len(batch)
        return loss

    # ------------------------------------------------------------------ decisions
    def holdout_metrics(self) -> tuple[dict[str, float], dict[str, float]]:
        """Click AUC and click log loss (of the observed click, PAL: examination x relevance)
        of the candidate, the current and the offline model on the holdout."""
        h = np.stack([e.h for e in self.holdout])
        z = np.stack([e.z for e in self.holdout]).astype(np.float64)
        y = np.stack([e.y for e in self.holdout])[:, CLICK]
        exam = self.current.examination(np.array([e.position for e in self.holdout]))
        logits = {"candidate": self.current.logits(h, z, self.w, self.b, self.wide)[:, CLICK],
                  "current": self.current.logits(h, z)[:, CLICK], "frozen": self.frozen.logits(h, z)[:, CLICK]}

        def losses(lg: np.ndarray) -> np.ndarray:
            p = np.clip(exam / (1.0 + np.exp(-np.clip(lg, -30, 30))), 1e-6, 1 - 1e-6)
            return -(y * np.log(p) + (1 - y) * np.log(1 - p))

        per = {k: losses(v) for k, v in logits.items()}
        self._paired = per["candidate"] - per["current"]  # per-example change, for the significance test
        return ({k: auc(v, y) for k, v in logits.items()}, {k: float(v.mean()) for k, v in per.items()})

    def validate(self, now_ms: int) -> dict:
        """Decide on the candidate: promote / reject / wait (not enough evidence or nothing new)."""
        n = len(self.holdout)
        pos = int(sum(e.y[CLICK] for e in self.holdout))
        d: dict = {"at_ms": now_ms, "holdout": n, "holdout_clicks": pos, "steps": self.steps,
                   "steps_since_promotion": self.steps_since_promotion, "trained_examples": self.trained,
                   "current": self.current_version, "lr": self.lr, "last_grad_norm": round(self.last_grad_norm, 4),
                   "clipped_steps": self.clipped_steps}
        if self.steps_since_promotion == 0:
            return {**d, "decision": "wait", "reason": "no training step since the last decision"}
        if n < self.ol.min_holdout or pos < self.ol.min_holdout_positives:
            return {**d, "decision": "wait", "reason": f"holdout too small ({n} examples, {pos} clicks)"}
        # data validation: training and holdout users are split by a hash, so their click rates over the
        # same window must agree; labels that disagree wildly (inverted, a broken join) train nothing
        n_t = len(self.train_recent)
        k_t = sum(c for _, c in self.train_recent)
        if n_t:
            p_t, p_h = k_t / n_t, pos / n
            pool = (k_t + pos) / (n_t + n)
            se = np.sqrt(max(pool * (1 - pool), 1e-12) * (1 / n_t + 1 / n))
            z = (p_t - p_h) / se
            ratio = max(p_t, 1e-6) / max(p_h, 1e-6)
            d.update(train_click_rate=round(p_t, 5), holdout_click_rate=round(p_h, 5), label_drift_z=round(float(z), 2))
            if abs(z) > self.ol.label_drift_z and not 1 / self.ol.label_drift_ratio <= ratio <= self.ol.label_drift_ratio:
                return {**d, "decision": "reject", "reason": f"label drift: training click rate {p_t:.4f} vs holdout "
                                                                f"{p_h:.4f} (z = {z:.1f}); labels are not trustworthy"}
        a, ll = self.holdout_metrics()
        d.update({f"auc_{k}": round(v, 5) for k, v in a.items()})
        d.update({f"logloss_{k}": round(v, 5) for k, v in ll.items()})
        # vs current (the rule), and vs the offline model the job started from: a stream that
        # degrades each candidate by a little less than the allowed drop must not ratchet down
        # promotion after promotion (measured on a poisoned stream: 11 promotions of -0.3% each)
        floor_cur = a["current"] * (1 - self.ol.max_auc_drop)
        floor_anchor = a["frozen"] * (1 - self.ol.max_auc_drop)
        floor = max(floor_cur, floor_anchor)
        d["auc_floor"] = round(floor, 5)
        ll_ceiling = ll["current"] * (1 + self.ol.max_logloss_increase)
        d["logloss_ceiling"] = round(ll_ceiling, 5)
        if ll["candidate"] > ll_ceiling:  # miscalibrated: e.g. a poisoned stream pushes every score up
            return {**d, "decision": "reject", "reason": f"holdout log loss {ll['candidate']:.4f} > {ll_ceiling:.4f} "
                                                            f"({self.ol.max_logloss_increase:.0%} above current)"}
        if a["candidate"] >= floor:
            # evidence that it helps: the paired per-example log-loss change must be an improvement beyond
            # noise (one-sided, promotion_z standard errors) and beyond min_logloss_improvement
            diff = self._paired
            gain, se = float(-diff.mean()), float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else np.inf
            d.update(logloss_gain=round(gain, 6), logloss_gain_se=round(se, 6))
            need = max(self.ol.promotion_z * se, self.ol.min_logloss_improvement * ll["current"])
            if gain <= need:
                return {**d, "decision": "reject", "reason": f"holdout log loss gain {gain:.5f} is not above "
                                                                f"{need:.5f} ({self.ol.promotion_z:g} standard errors)"}
            return {**d, "decision": "promote"}
        which = "current" if floor_cur >= floor_anchor else "offline model"
        base = a["current"] if which == "current" else a["frozen"]
        return {**d, "decision": "reject", "reason": f"holdout AUC {a['candidate']:.4f} < {floor:.4f} "
                                                        f"({self.ol.max_auc_drop:.0%} below the {which}'s {base:.4f})"}

    def candidate(self) -> NumpyHeavy:
        return self.current.with_final(self.w, self.b, self.wide)

    def promoted(self, model: NumpyHeavy, version: str) -> None:
        self.current, self.current_version = model, version
        self.steps_since_promotion = 0

    def rejected(self) -> None:
        """A rejected candidate is discarded: training restarts from the current weights."""
        self.w, self.b, self.wide = self.current.final_w.copy(), self.current.final_b.copy(), self.current.wide.copy()
        self.steps_since_promotion = 0

    def reset_to(self, model: NumpyHeavy, version: str, anchor: bool = False) -> None:
        """After a rollback or a pointer move: ``version`` becomes current and the candidate's start; the
        buffered examples are re-featurised under it (another offline model has other towers and
        statistics). ``anchor``: it is a new offline model, so it is also the AUC floor's anchor."""
        self.current, self.current_version = model, version
        if anchor:
            self.frozen = model
        self.w, self.b, self.wide = model.final_w.copy(), model.final_b.copy(), model.wide.copy()
        self.steps_since_promotion = 0
        for buf in (self.batch, self.holdout):
            rows = [e for e in buf if e.x is not None]
            if rows:
                z = model.normalized(np.stack([e.x for e in rows])).astype(np.float32)
                h = model.hidden(None, z=z)
                for i, e in enumerate(rows):
                    e.z, e.h = z[i], h[i]

    def rollback_check(self, current: str, previous: str | None, now_ms: int) -> dict | None:
        """A rollback decision when the current version's live CTR has dropped; else None."""
        if previous is None or previous == current:
            return None
        n_cur, ctr_cur = self.live.ctr(current, now_ms)
        n_prev, ctr_prev = self.live.ctr(previous, now_ms)
        need = self.ol.rollback_min_exposures
        if n_cur < need or n_prev < need:
            return None
        if ctr_cur < ctr_prev * (1 - self.ol.rollback_ctr_drop):
            return {"at_ms": now_ms, "decision": "rollback", "from": current, "to": previous,
                    "ctr_current": round(ctr_cur, 5), "ctr_previous": round(ctr_prev, 5),
                    "exposures_current": n_cur, "exposures_previous": n_prev,
                    "reason": f"live CTR {ctr_cur:.4f} is more than {self.ol.rollback_ctr_drop:.0%} below "
                              f"{previous}'s {ctr_prev:.4f}"}
        return None


class LearnerLoop:
    """The learner's dealings with the model store, each interval: it trains from the store's
    ``current`` version and from nothing else.

    * Before deciding it reads the pointer; if ``current`` moved (an operator's rollback, a newer
      offline model, another learner) it discards its candidate and continues from the new current
      (decision ``rebase``) -- it never promotes over a version it did not start from.
    * A promotion is a compare-and-set on the pointer (``expect`` = the parent): if the pointer moves
      between the check and the write the candidate stays unpromoted (decision ``superseded``).
    * A rollback is a compare-and-set too, and is itself the new starting point.
    * Models whose feature schema is not the serving schema are refused (models.store.require_schema).
    """

    def __init__(self, ol: Any, store: Any, serving_schema: str, model: str = "heavy"):
        self.ol, self.store, self.schema, self.model = ol, store, serving_schema, model
        version = store.current(model)
        if version is None:
            raise RuntimeError(f"online learner: no current {model} model in the store (run `feedrank train {model}`)")
        self.learner = OnlineLearner(ol, self.load(version), version)

    def load(self, version: str) -> NumpyHeavy:
        from models.store import require_schema

        ck, path = self.store.fetch(self.model, version)
        require_schema(ck, self.schema)
        if not (path / "heavy.npz").exists():
            raise RuntimeError(f"{self.model} {version} has no heavy.npz (published by an older feedrank): "
                               "run `feedrank train heavy` again")
        return NumpyHeavy.from_npz(str(path / "heavy.npz"))

    def _rebase(self, version: str, at_ms: int, reason: str) -> dict:
        was = self.learner.current_version
        offline = not self.store.meta(self.model, version).extra.get("online")
        self.learner.reset_to(self.load(version), version, anchor=offline)
        return {"at_ms": at_ms, "decision": "rebase", "from": was, "to": version, "new_anchor": offline,
                "reason": reason}

    def decide(self, now_ms: int) -> list[dict]:
        """This interval's decisions (promote / reject / wait / rebase / superseded, then maybe rollback)."""
        from models.store import ModelStoreError, PointerMoved, SchemaMismatch

        ptr = self.store.pointer(self.model)
        if ptr["version"] != self.learner.current_version:
            try:
                return [self._rebase(ptr["version"], now_ms, f"current moved to {ptr['version']} (not by this "
                                                             f"learner): the candidate trained from "
                                                             f"{self.learner.current_version} is discarded")]
            except SchemaMismatch as e:  # nothing is promoted over it; serving refuses it too
                return [{"at_ms": now_ms, "decision": "wait", "current": self.learner.current_version,
                         "reason": f"not learning: {e}"}]
        out = []
        d = self.learner.validate(now_ms)
        if d["decision"] == "promote":
            cand = self.learner.candidate()
            try:
                ck = self._publish(cand, d)
                self.learner.promoted(cand, ck.version)
                d["version"] = ck.version
            except PointerMoved as e:
                out.append({**d, "decision": "superseded", "reason": str(e)})
                d = self._rebase(e.found, now_ms, "current moved while the candidate was published")
        elif d["decision"] == "reject":
            self.learner.rejected()
        out.append(d)
        ptr = self.store.pointer(self.model)
        current, previous = ptr["version"], (ptr["history"] or [None])[0]
        if current != self.learner.current_version:
            return out  # the next interval rebases
        rb = self.learner.rollback_check(current, previous, now_ms)
        if rb is not None:
            try:
                rb["to"] = self.store.rollback(self.model, expect=current)
            except (PointerMoved, ModelStoreError) as e:
                out.append({**rb, "decision": "wait", "reason": f"rollback not done: {e}"})
                return out
            self.learner.reset_to(self.load(rb["to"]), rb["to"])
            out.append(rb)
        return out

    def _publish(self, cand: NumpyHeavy, d: dict) -> Any:
        parent = self.learner.current_version
        pck, ppath = self.store.fetch(self.model, parent)
        metrics = {k: v for k, v in d.items() if k.startswith(("auc_", "logloss_"))
                   or k in ("holdout", "holdout_clicks", "steps", "auc_floor", "logloss_ceiling")}
        return self.store.publish(
            self.model, {"heavy.ts": (ppath / "heavy.ts").read_bytes(), "heavy.npz": cand.to_npz(),
                         "final.npz": cand.final_npz()},
            parent=parent, feature_schema_hash=pck.feature_schema_hash, metrics=metrics,
            data_window={"online_until_ms": d["at_ms"]}, extra={**pck.extra, "online": True},
            promote=True, expect=parent)
