"""`feedrank bench ...`: measured numbers, written as JSON + markdown under bench/results/.

Every figure is measured in the run that reports it, on the machine it names.
"""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from feedrank.config import PROJECT_ROOT, Config


def machine() -> dict:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version()}


def write_result(name: str, result: dict, out_dir: Path | None = None) -> Path:
    out_dir = out_dir or PROJECT_ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    result = {"bench": name, "at": stamp, "machine": machine(), **result}
    path = out_dir / f"{name}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    md = [f"# bench: {name} ({stamp})", "", f"Machine: {result['machine']}", "", "```json",
          json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2), "```", ""]
    path.with_suffix(".md").write_text("\n".join(md))
    return path


def bench_retrieval(cfg: Config, world_dir: Path, k: int = 8000, n_tune: int = 100, n_latency: int = 1000,
                    target: float = 0.95, progress=None) -> dict:
    """Recall@k vs exact and per-query latency of the IVF index over every post of a world.

    Post vectors come from the current two-tower's post tower (content only, so it embeds
    posts it never saw); queries are user-tower embeddings of real user states.
    """
    import faiss
    import pyarrow.parquet as pq
    import torch

    from models.retrieval import RetrievalIndex, recall
    from models.store import ModelStore
    from models.train import load_two_tower
    from features.offline import History
    from models.towers import PostFeaturizer, UserInputs, embed_posts, embed_users, follows_bag
    from sim.world import DAY_MS, World

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)  # one thread per serving worker, as in production
    step = progress or (lambda s, f: None)
    store = ModelStore.from_config(cfg)
    model, _ = load_two_tower(store)
    world = World.load(world_dir)
    step("embedding posts", 0.0)
    text = pq.read_table(world_dir / "posts.parquet", columns=["text"]).column("text").to_pylist()
    emb = np.zeros((world.n_posts, model.config["dim"]), dtype=np.float32)
    feat = PostFeaturizer()
    chunk = 100_000
    for i in range(0, world.n_posts, chunk):
        sl = slice(i, i + chunk)
        emb[sl] = embed_posts(model, feat(text[sl], world.post_author[sl], world.post_topic[sl], world.post_ctype[sl]))
        step("embedding posts", min(1.0, (i + chunk) / world.n_posts))
    day = world.post_ts / DAY_MS
    idx = RetrievalIndex(dim=model.config["dim"], kind=cfg.retrieval.index, nlist=cfg.retrieval.nlist,
                         nprobe=cfg.retrieval.nprobe, day0=float(day.min()),
                         temperature=float(model.config.get("temperature", 0.05)), recency=float(model.recency.detach()))
    step("building IVF", 0.0)
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # building may use every core
    t0 = time.perf_counter()
    ids = np.arange(world.n_posts, dtype=np.int64)
    idx.build(ids, emb, day)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    # queries: user embeddings from random users' current engagement profile
    hist = History.load(world_dir, world)
    rng = np.random.default_rng(0)
    users = rng.choice(world.n_users, n_tune + n_latency, replace=False)

    st = hist.user_state(users, np.full(users.size, world.end_ms))
    fid, foff = follows_bag(world.follow_src, world.follow_dst, users, world.n_users)
    q = embed_users(model, UserInputs(torch.from_numpy(st.dense()), fid, foff))
    step("exact search for recall", 0.0)
    exact = idx.exact(q[:n_tune], k, ids, emb, day)
    step("tuning nprobe", 0.0)
    tuned = idx.tune_nprobe(q[:n_tune], k, exact, target=target)
    step("latency", 0.0)
    lat = []
    for i in range(n_tune, n_tune + n_latency):
        t1 = time.perf_counter()
        idx.search(q[i: i + 1], k)
        lat.append((time.perf_counter() - t1) * 1000)
    lat = np.array(lat)
    _, got = idx.search(q[:n_tune], k)
    return {"posts": int(world.n_posts), "k": k, "index": cfg.retrieval.index, "nlist": int(getattr(idx.index, "nlist", 0)),
            "nprobe": idx.nprobe, "recall_vs_exact": round(recall(got, exact), 4), "tuning": tuned["trials"],
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 3), "p99": round(float(np.percentile(lat, 99)), 3),
                           "mean": round(float(lat.mean()), 3), "queries": int(lat.size)},
            "build_seconds": round(build_s, 1), "threads": 1, "world": str(world_dir)}


def bench_rankers(cfg: Config, n_light: int = 10_000, n_heavy: int = 500, repeats: int = 300) -> dict:
    """Light ranker over 10K candidates and the TorchScript heavy ranker over 500, one thread."""
    import torch

    from features.schema import HEAVY_FEATURES, LIGHT_FEATURES
    from models.rankers import LightRanker, load_torchscript
    from models.store import ModelStore

    torch.set_num_threads(1)
    store = ModelStore.from_config(cfg)
    _, lpath = store.fetch("light")
    light = LightRanker.from_bytes((lpath / "light.npz").read_bytes())
    hck, hpath = store.fetch("heavy")
    heavy = load_torchscript((hpath / "heavy.ts").read_bytes())
    rng = np.random.default_rng(0)
    xl = rng.normal(size=(n_light, len(LIGHT_FEATURES))).astype(np.float32)
    xh = torch.from_numpy(rng.normal(size=(n_heavy, len(HEAVY_FEATURES))).astype(np.float32))

    def timed(fn) -> dict:
        for _ in range(20):
            fn()  # warm-up (TorchScript profiling runs)
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1000)
        a = np.array(t)
        return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}

    with torch.inference_mode():
        heavy_t = timed(lambda: heavy(xh))
    return {"light": {"rows": n_light, **timed(lambda: light.score(xl))},
            "heavy": {"rows": n_heavy, "version": hck.version, **heavy_t}, "threads": 1}
