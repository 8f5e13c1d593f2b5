"""`feedrank train two-tower|light|heavy|all`: fit on the simulator's logs, publish to the store.

Published models (each a versioned checkpoint with data window, metrics and the feature
schema hash): ``two_tower`` (towers), ``retrieval`` (FAISS index + post embeddings,
parent = the two-tower version), ``light`` (logistic regression), ``heavy`` (TorchScript
serving module + full state for the online learner + learned examination curve).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from core.config import Config
from core.schema import HEAD_NAMES, HEAVY_FEATURES, HEAVY_NAMES, LIGHT_FEATURES, bounds, schema_hash
from models import rankers
from models.rankers import HeavyRanker, LightRanker
from models.retrieval import RetrievalIndex
from models.sim_data import SimData
from models.store import Checkpoint, ModelStore
from models.inference import load_numpy_towers  # noqa: F401  (re-exported)
from models.towers import TwoTower, embed_posts, subset_posts, train_two_tower
from core.units import DAY_MS

Progress = Callable[[str, float], None]


def _noop(stage: str, frac: float) -> None:
    pass


@dataclass
class Trained:
    two_tower: TwoTower | None = None
    post_emb: np.ndarray | None = None
    index: RetrievalIndex | None = None
    light: LightRanker | None = None
    heavy: HeavyRanker | None = None
    heavy_blind: HeavyRanker | None = None


# --------------------------------------------------------------------------- two-tower


def fit_two_tower(data: SimData, epochs: int = 4, seed: int = 0, progress: Progress = _noop,
                  author_dim: int = 64) -> tuple[TwoTower, np.ndarray, dict]:
    """Positives: clicks in the training window, with the user's state at click time."""
    imp, y = data.impressions, data.labels
    pos_rows = np.flatnonzero(data.train_mask & (y[:, 0] > 0))
    users = imp["user_id"].to_numpy()[pos_rows]
    posts = imp["post_id"].to_numpy()[pos_rows]
    t = imp["ts"].to_numpy()[pos_rows]
    all_posts = data.post_inputs()
    model = TwoTower(n_topics=data.world.n_topics, author_dim=author_dim)
    t0 = time.perf_counter()
    losses = train_two_tower(model, data.user_inputs(users, t), subset_posts(all_posts, posts), posts,
                             t / DAY_MS, data.world.post_ts[posts] / DAY_MS, epochs=epochs, seed=seed,
                             progress=lambda f: progress("two-tower", f))
    emb = embed_posts(model, all_posts)
    return model, emb, {"train_loss": [round(x, 4) for x in losses], "positives": int(pos_rows.size),
                        "seconds": round(time.perf_counter() - t0, 1), "recency": float(model.recency.detach())}


def index_for(cfg: Config, model: TwoTower, day0: float) -> RetrievalIndex:
    """An empty index configured from feedrank.toml and the towers' temperature and recency weight."""
    return RetrievalIndex(dim=int(model.config.get("dim", cfg.retrieval.dim)), kind=cfg.retrieval.index,
                          nlist=cfg.retrieval.nlist, nprobe=cfg.retrieval.nprobe, day0=day0,
                          temperature=float(model.config.get("temperature", 0.05)),
                          recency=float(model.recency.detach()))


def fit_index(data: SimData, model: TwoTower, post_emb: np.ndarray, cfg: Config, n_queries: int = 50,
              k: int | None = None, seed: int = 0) -> tuple[RetrievalIndex, dict]:
    """Build IVF over all posts and tune nprobe to recall >= 0.95 at k vs exact search."""
    w = data.world
    k = min(k or cfg.candidates.ann_k, max(1, w.n_posts // 2))
    day = w.post_ts / DAY_MS
    idx = index_for(cfg, model, float(day.min()))
    ids = np.arange(w.n_posts, dtype=np.int64)
    idx.build(ids, post_emb, day, seed=seed)
    rows = data.sample_rows(~data.train_mask, n_queries, seed)
    imp = data.impressions
    q = data.user_embeddings(model, imp["user_id"].to_numpy()[rows], imp["ts"].to_numpy()[rows])
    exact = idx.exact(q, k, ids, post_emb, day)
    tuned = idx.tune_nprobe(q, k, exact, target=0.95)
    t0 = time.perf_counter()
    for i in range(len(q)):
        idx.search(q[i: i + 1], k)
    ms = (time.perf_counter() - t0) * 1000 / len(q)
    return idx, {"k": k, "nlist": int(getattr(idx.index, "nlist", 0)), **tuned, "mean_ms_per_query": round(ms, 3)}


# --------------------------------------------------------------------------- rankers


def ranking_rows(data: SimData, model: TwoTower, post_emb: np.ndarray, rows: np.ndarray) -> dict:
    """Heavy features (light ones first) and labels for impression rows."""
    imp = data.impressions
    users = imp["user_id"].to_numpy()[rows]
    posts = imp["post_id"].to_numpy()[rows]
    t = imp["ts"].to_numpy()[rows]
    ue = data.user_embeddings(model, users, t)
    served = imp["ts"].groupby(imp["request_id"]).transform("min").to_numpy()[rows]  # when the request was served
    x = data.history.heavy_features(users, posts, t, ue, post_emb[posts],
                                    in_network=(imp["source"].to_numpy()[rows] == "in_network"), request_t=served)
    return {"x": x, "y": data.labels[rows], "position": imp["position"].to_numpy()[rows], "users": users,
            "posts": posts, "t": t}


def fit_light(train: dict) -> LightRanker:
    n = len(LIGHT_FEATURES)
    return LightRanker.fit(train["x"][:, :n], train["y"][:, 0], weight=train.get("weight"))


def heavy_input_mask(masked: list[str]) -> np.ndarray:
    """1 per heavy feature column, 0 for the columns ``masked`` names (a feature group or a
    feature name; anything else is an error naming what is known)."""
    groups = {f.group for f in HEAVY_FEATURES}
    unknown = sorted(set(masked) - groups - set(HEAVY_NAMES))
    if unknown:
        raise ValueError(f"training.heavy_masked: unknown feature groups or names {unknown}; groups: {sorted(groups)}")
    return np.array([0.0 if (f.group in masked or f.name in masked) else 1.0 for f in HEAVY_FEATURES], dtype=np.float32)


def fit_heavy(train: dict, position_aware: bool = True, epochs: int = 3, seed: int = 0,
              progress: Progress = _noop, masked: list[str] | None = None, *,
              feature_clip: float) -> tuple[HeavyRanker, dict]:
    x = train["x"]
    m = HeavyRanker(x.shape[1], position_aware=position_aware, feature_clip=feature_clip)
    if masked:
        m.set_input_mask(heavy_input_mask(masked))
    mean, std = x.mean(0), x.std(0)
    lo, hi = bounds(HEAVY_FEATURES)
    m.set_normalization(mean.astype(np.float32), np.where(std < 1e-6, 1.0, std).astype(np.float32), lo, hi)
    t0 = time.perf_counter()
    losses = rankers.train_heavy(m, x, train["y"], train["position"], epochs=epochs, seed=seed, weight=train.get("weight"),
                                 progress=lambda f: progress("heavy" + ("" if position_aware else " (position-blind)"), f))
    return m, {"train_loss": [round(v, 4) for v in losses], "rows": int(x.shape[0]),
               "seconds": round(time.perf_counter() - t0, 1), "masked": list(masked or [])}


# --------------------------------------------------------------------------- publish


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def publish_two_tower(cfg: Config, store: ModelStore, model: TwoTower, index: RetrievalIndex, emb: np.ndarray,
                      window: dict | None = None, metrics: dict | None = None,
                      index_metrics: dict | None = None) -> tuple[Checkpoint, Checkpoint]:
    """Publish and promote the towers, then the index built from them (its parent)."""
    from models.towers import NumpyTowers

    ck = store.publish("two_tower", {"model.pt": rankers.state_bytes(model), "towers.npz": NumpyTowers.npz(model)},
                       data_window=window, metrics=metrics,
                       extra={"config": model.config}, promote=True)
    store.apply_retention("two_tower")
    tmp = cfg.data_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"index-{ck.version}.faiss"
    index.save(path)
    params = {"dim": index.dim, "kind": index.kind, "nlist": index.nlist, "nprobe": index.nprobe, "day0": index.day0,
              "temperature": index.temperature, "recency": index.recency}
    ick = store.publish("retrieval", {"index.faiss": path, "post_emb.npy": _npy(emb.astype(np.float16)),
                                      "params.json": json.dumps(params).encode()},
                        parent=ck.version, data_window=window, metrics=index_metrics, promote=True)
    path.unlink()
    store.apply_retention("retrieval")
    return ck, ick


def publish_heavy(cfg: Config, store: ModelStore, heavy: HeavyRanker, window: dict, metrics: dict,
                  promote: bool = True, extra: dict | None = None) -> Checkpoint:
    """Publish a heavy ranker in every form serving and the learner load (TorchScript, numpy)."""
    weights = np.array([cfg.heads.weights()[h] for h in HEAD_NAMES], dtype=np.float32)
    curve = heavy.examination_curve(np.arange(1, 41))
    ck = store.publish("heavy", {"heavy.ts": rankers.export_torchscript(heavy, weights),
                                 "heavy_state.pt": rankers.state_bytes(heavy), "heavy.npz": rankers.heavy_npz(heavy)},
                       data_window=window, feature_schema_hash=schema_hash(HEAVY_FEATURES), metrics=metrics,
                       extra={"head_weights": weights.tolist(), "examination_curve": (curve / curve[0]).round(4).tolist(),
                              **(extra or {})}, promote=promote)
    store.apply_retention("heavy")
    return ck


def load_retrieval(store: ModelStore, version: str | None = None) -> tuple[RetrievalIndex, str]:
    """The retrieval index of ``version`` (default: current) and that version."""
    ck, path = store.fetch("retrieval", version)
    params = json.loads((path / "params.json").read_text())
    return RetrievalIndex.load(path / "index.faiss", **params), ck.version


def train_all(cfg: Config, data_dir: str, which: str = "all", store: ModelStore | None = None,
              heavy_rows: int | None = None, tt_epochs: int | None = None, heavy_epochs: int | None = None,
              seed: int = 0, progress: Progress = _noop, with_blind: bool = False) -> dict:
    """Train what ``which`` names (two-tower | light | heavy | all); publish and promote each.
    Sizes not given come from ``[training]`` in feedrank.toml."""
    tc = cfg.training
    heavy_rows = heavy_rows or tc.heavy_rows
    tt_epochs = tt_epochs or tc.two_tower_epochs
    heavy_epochs = heavy_epochs or tc.heavy_epochs
    store = store or ModelStore.from_config(cfg)
    progress("loading data", 0.0)
    data = SimData.load(data_dir)
    out: dict = {"window": data.window}
    trained = Trained()
    if which in ("two-tower", "all"):
        model, emb, m = fit_two_tower(data, epochs=tt_epochs, seed=seed, progress=progress, author_dim=tc.two_tower_author_dim)
        progress("retrieval index", 0.0)
        index, im = fit_index(data, model, emb, cfg, seed=seed)
        ck, ick = publish_two_tower(cfg, store, model, index, emb, data.window, m, im)
        out["two_tower"] = {"version": ck.version, **m}
        out["retrieval"] = {"version": ick.version, **im}
        trained.two_tower, trained.post_emb, trained.index = model, emb, index
    if which in ("light", "heavy", "all"):
        if trained.two_tower is None:
            trained.two_tower, trained.post_emb = load_two_tower(store, data)
        progress("ranking features", 0.0)
        rows = data.sample_rows(data.train_mask, heavy_rows, seed)
        train = ranking_rows(data, trained.two_tower, trained.post_emb, rows)
        if which in ("light", "all"):
            trained.light = fit_light(train)
            ck = store.publish("light", {"light.npz": trained.light.to_bytes()}, data_window=data.window,
                               feature_schema_hash=schema_hash(LIGHT_FEATURES), promote=True,
                               metrics={"rows": int(rows.size)})
            store.apply_retention("light")
            out["light"] = {"version": ck.version}
        if which in ("heavy", "all"):
            heavy, hm = fit_heavy(train, True, heavy_epochs, seed, progress, tc.heavy_masked,
                                  feature_clip=tc.heavy_feature_clip)
            trained.heavy = heavy
            ck = publish_heavy(cfg, store, heavy, data.window, hm)
            out["heavy"] = {"version": ck.version, **hm}
            if with_blind:
                trained.heavy_blind, bm = fit_heavy(train, False, heavy_epochs, seed, progress, tc.heavy_masked,
                                                    feature_clip=tc.heavy_feature_clip)
                out["heavy_position_blind"] = bm
    out["trained"] = trained
    out["data"] = data
    return out


def load_two_tower_model(store: ModelStore, version: str | None = None) -> TwoTower:
    """The two-tower model of ``version`` (default: current), in eval mode."""
    _, path = store.fetch("two_tower", version)
    blob = torch.load(path / "model.pt", weights_only=False)
    model = TwoTower(**{k: v for k, v in blob["config"].items() if k in ("n_topics", "dim", "text_dim", "hidden", "author_dim")})
    model.config.update(blob["config"])
    model.load_state_dict(blob["state"])
    return model.eval()


def load_two_tower(store: ModelStore, data: SimData | None = None) -> tuple[TwoTower, np.ndarray]:
    model = load_two_tower_model(store)
    if data is not None:
        return model, embed_posts(model, data.post_inputs())
    _, rpath = store.fetch("retrieval")
    return model, np.load(rpath / "post_emb.npy").astype(np.float32)
