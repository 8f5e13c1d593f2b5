"""`feedrank train light|heavy --from-lake`: fit the rankers on a training set built from the lake (what
serving logged: the served feature rows, the logged positions, labels from real engagements) — no
simulator involved. The training set comes from ``feedrank batch run training-set`` (jobs/training_set.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config
from core.schema import HEAVY_FEATURES, LIGHT_FEATURES, schema_hash
from features import lake
from models.evaluate import auc, heavy_predict
from models.store import ModelStore
from models.train import Progress, fit_heavy, fit_light, publish_heavy


def _quiet(stage: str, frac: float) -> None:
    pass


class LakeTrainingError(ValueError):
    """The training set cannot train a model (empty, no positives, rows of another feature schema)."""


def load(set_dir: Path) -> tuple[dict, dict, dict]:
    """(meta, train, validation) of a training set, checked against the features this build serves."""
    meta = json.loads((set_dir / "_meta.json").read_text())
    train, valid = lake.read_training_set(set_dir, "train"), lake.read_training_set(set_dir, "validation")
    serving = schema_hash(HEAVY_FEATURES)
    for name, split in (("train", train), ("validation", valid)):
        other = [h for h in split["feature_schema"] if h != serving]
        if other:
            raise LakeTrainingError(f"{set_dir}: {name} rows were served with feature schema {other} and this build "
                                    f"serves {serving}: train on a window logged by this schema")
    if len(train["x"]) == 0 or train["y"][:, 0].sum() == 0:
        raise LakeTrainingError(f"{set_dir}: {len(train['x'])} training rows with {int(train['y'][:, 0].sum())} clicks: "
                                "nothing to learn from (a longer --window, or more traffic)")
    return meta, train, valid


def window(meta: dict, set_dir: Path, rows: int) -> dict[str, Any]:
    """What a model's metadata says it was trained on."""
    return {"source": "lake", "dates": meta["dates"], "training_set": str(set_dir), "rows": rows,
            "lake_schema": lake.schema_hash(), "feature_schema": schema_hash(HEAVY_FEATURES),
            "negatives_per_positive": meta["negatives_per_positive"], "attribution_window_s": meta["attribution_window_s"]}


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    a = auc(y, s) if len(y) else float("nan")
    return None if math.isnan(a) else round(a, 4)


def train_from_lake(cfg: Config, which: str, set_dir: Path, store: ModelStore | None = None,
                    epochs: int | None = None, seed: int = 0, progress: Progress = _quiet,
                    promote_heavy: bool = True) -> dict[str, Any]:
    """Fit ``light`` or ``heavy`` (or ``both``) on the training set in ``set_dir``; publish and promote (the
    heavy ranker only if ``promote_heavy``: otherwise it is a candidate for shadow scoring)."""
    store = store or ModelStore.from_config(cfg)
    meta, train, valid = load(set_dir)
    win = window(meta, set_dir, len(train["x"]))
    out: dict[str, Any] = {"training_set": str(set_dir), "train_rows": len(train["x"]), "validation_rows": len(valid["x"]),
                           "dates": meta["dates"]}
    if which in ("light", "both"):
        progress("light ranker", 0.0)
        light = fit_light(train)
        n = len(LIGHT_FEATURES)
        m = {"rows": len(train["x"]), "validation_click_auc": _auc(valid["y"][:, 0], light.score(valid["x"][:, :n]))
             if len(valid["x"]) else None}
        ck = store.publish("light", {"light.npz": light.to_bytes()}, data_window=win,
                           feature_schema_hash=schema_hash(LIGHT_FEATURES), promote=True, metrics=m)
        store.apply_retention("light")
        out["light"] = {"version": ck.version, **m}
    if which in ("heavy", "both"):
        heavy, hm = fit_heavy(train, True, epochs or cfg.training.heavy_epochs, seed, progress, cfg.training.heavy_masked,
                              feature_clip=cfg.training.heavy_feature_clip)
        if len(valid["x"]):
            hm["validation_click_auc"] = _auc(valid["y"][:, 0], heavy_predict(heavy, valid["x"])[:, 0])
        ck = publish_heavy(cfg, store, heavy, win, hm, promote=promote_heavy)
        out["heavy"] = {"version": ck.version, **hm}
    return out


def train_two_tower_from_lake(cfg: Config, date: str, window_days: int, store: ModelStore | None = None,
                              epochs: int | None = None, seed: int = 0, progress: Progress = _quiet) -> dict[str, Any]:
    """Fit the two-tower on the lake's window (clicks as positives, the user's state at click time from the
    logged history), build and tune its FAISS index over every post the lake knows, publish and promote both."""
    from features.lake_corpus import export_corpus
    from models.sim_data import SimData
    from models.train import fit_index, fit_two_tower, publish_two_tower

    store = store or ModelStore.from_config(cfg)
    dates = lake.days(date, window_days)
    out_dir = lake.lake_dir(cfg) / "corpora" / f"{date}-{window_days}d"
    progress("corpus from the lake", 0.0)
    counts = export_corpus(cfg, dates, out_dir)
    data = SimData.load(out_dir, valid_days=window_days * cfg.lake.validation_fraction)
    if int((data.train_mask & (data.labels[:, 0] > 0)).sum()) == 0:
        raise LakeTrainingError(f"{out_dir}: no clicks before the validation split: nothing to learn from")
    tc = cfg.training
    model, emb, m = fit_two_tower(data, epochs=epochs or tc.two_tower_epochs, seed=seed, progress=progress,
                                  author_dim=tc.two_tower_author_dim)
    progress("retrieval index", 0.0)
    index, im = fit_index(data, model, emb, cfg, seed=seed)
    win = {"source": "lake", "dates": dates, "corpus": str(out_dir), "lake_schema": lake.schema_hash(),
           **{k: counts[k] for k in ("impressions", "engagements", "posts", "unknown_posts", "users", "follows")}}
    ck, ick = publish_two_tower(cfg, store, model, index, emb, win, m, im)
    return {"corpus": counts, "two_tower": {"version": ck.version, **m}, "retrieval": {"version": ick.version, **im}}
