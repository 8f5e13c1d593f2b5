"""MovieLens-100K: the two-tower on real data, next to popularity and BPR-MF baselines.

The data ships inside the ``recbole==1.2.1`` wheel (``recbole/dataset_example/ml-100k``);
it is downloaded into a local cache with ``pip download`` and read from the wheel, never
committed (its licence forbids redistribution). Protocol: leave-last-out by time per
user (last interaction = test, the one before = validation), full ranking over all
items with the user's earlier items excluded; Recall@10 and NDCG@10.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from models.towers import PostFeaturizer, TwoTower, UserInputs, author_bucket, embed_posts, embed_users, subset_posts, train_two_tower

WHEEL = "recbole==1.2.1"
PREFIX = "recbole/dataset_example/ml-100k/"
HISTORY = 50  # most recent items in the user tower's history bag


def fetch(cache_dir: Path) -> Path:
    """The recbole wheel in the cache (downloaded once with pip)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob("recbole-1.2.1-*.whl"))
    if not found:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache_dir), WHEEL],
                           capture_output=True, text=True)
        found = sorted(cache_dir.glob("recbole-1.2.1-*.whl"))
        if not found:
            raise RuntimeError(f"could not download {WHEEL} (needed for MovieLens-100K): {r.stderr[-500:]}")
    return found[0]


@dataclass
class ML100K:
    n_users: int
    n_items: int
    train: pd.DataFrame   # user, item, ts (dense ids)
    valid: pd.DataFrame
    test: pd.DataFrame
    titles: list[str]
    genre: np.ndarray     # [items] primary genre id
    genres: np.ndarray    # [items, G] multi-hot
    genre_names: list[str]

    @classmethod
    def load(cls, cache_dir: Path) -> "ML100K":
        with zipfile.ZipFile(fetch(cache_dir)) as z:
            inter = pd.read_csv(io.BytesIO(z.read(PREFIX + "ml-100k.inter")), sep="\t")
            item = pd.read_csv(io.BytesIO(z.read(PREFIX + "ml-100k.item")), sep="\t")
        inter.columns = ["user", "item", "rating", "ts"]
        item.columns = ["item", "title", "year", "genres"]
        uid = {u: i for i, u in enumerate(sorted(inter.user.unique()))}
        iid = {v: i for i, v in enumerate(sorted(set(inter.item.unique()) | set(item.item.unique())))}
        inter["user"] = inter.user.map(uid)
        inter["item"] = inter.item.map(iid)
        item = item[item.item.isin(iid)].assign(item=lambda d: d.item.map(iid)).set_index("item")
        names = sorted({g for gs in item.genres.fillna("").str.split() for g in gs})
        n_items = len(iid)
        gm = np.zeros((n_items, len(names)), dtype=np.float32)
        titles = [""] * n_items
        for i, row in item.iterrows():
            titles[i] = str(row.title)
            for g in str(row.genres).split():
                gm[i, names.index(g)] = 1.0
        primary = np.where(gm.sum(1) > 0, gm.argmax(1), 0)
        inter = inter.sort_values(["user", "ts", "item"], kind="stable")
        rank = inter.groupby("user").cumcount(ascending=False)  # 0 = last by time
        return cls(len(uid), n_items, inter[rank >= 2][["user", "item", "ts"]], inter[rank == 1][["user", "item", "ts"]],
                   inter[rank == 0][["user", "item", "ts"]], titles, primary, gm, names)


def full_ranking_metrics(scores: np.ndarray, seen: list[np.ndarray], target: np.ndarray, k: int = 10) -> dict:
    """Recall@k and NDCG@k with one held-out item per user, seen items excluded."""
    s = scores.copy()
    for u, items in enumerate(seen):
        s[u, items] = -np.inf
    tgt = s[np.arange(len(target)), target]
    rank = (s > tgt[:, None]).sum(1)
    hit = rank < k
    return {"recall@10": round(float(hit.mean()), 4), "ndcg@10": round(float((hit / np.log2(rank + 2)).mean()), 4)}


class BPR(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int = 64):
        super().__init__()
        self.u = nn.Embedding(n_users, dim)
        self.i = nn.Embedding(n_items, dim)
        nn.init.normal_(self.u.weight, std=0.1)
        nn.init.normal_(self.i.weight, std=0.1)


def train_bpr(inter: pd.DataFrame, n_users: int, n_items: int, epochs: int = 40, dim: int = 64, lr: float = 5e-3,
              l2: float = 1e-5, seed: int = 0) -> BPR:
    """BPR-MF with uniform negative sampling."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    m = BPR(n_users, n_items, dim)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    u = torch.from_numpy(inter.user.to_numpy())
    i = torch.from_numpy(inter.item.to_numpy())
    n = u.numel()
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(n))
        for s in range(0, n, 2048):
            idx = perm[s: s + 2048]
            neg = torch.from_numpy(rng.integers(0, n_items, idx.numel()))
            pu, pi, pj = m.u(u[idx]), m.i(i[idx]), m.i(neg)
            loss = -F.logsigmoid((pu * pi).sum(1) - (pu * pj).sum(1)).mean() + l2 * (pu.pow(2).sum() + pi.pow(2).sum() + pj.pow(2).sum()) / idx.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return m


def _user_inputs(d: ML100K, users: np.ndarray, history: pd.DataFrame, exclude: np.ndarray | None = None) -> UserInputs:
    """User tower inputs: genre profile (in the topic slots) + bag of history items."""
    from features.offline import USER_DENSE_DIM

    hist = history.groupby("user").item.apply(np.array).reindex(range(d.n_users))
    dense = np.zeros((users.size, USER_DENSE_DIM), dtype=np.float32)
    ids, offs = [], []
    for r, u in enumerate(users):
        items = hist.iat[u] if isinstance(hist.iat[u], np.ndarray) else np.array([], dtype=np.int64)
        if exclude is not None:
            items = items[items != exclude[r]]
        g = d.genres[items].sum(0) if items.size else np.zeros(d.genres.shape[1])
        dense[r, : g.size] = g / max(g.sum(), 1)
        dense[r, -1] = np.log1p(items.size) / 8
        offs.append(len(ids))
        ids.extend(author_bucket(items[-HISTORY:]).tolist() or [0])
    return UserInputs(torch.from_numpy(dense), torch.tensor(ids, dtype=torch.int64), torch.tensor(offs, dtype=torch.int64))


def evaluate(cache_dir: Path, epochs: int = 20, seed: int = 0, progress=None) -> dict:
    t0 = time.perf_counter()
    d = ML100K.load(cache_dir)
    users = np.arange(d.n_users)
    seen = [g.to_numpy() for _, g in pd.concat([d.train, d.valid]).groupby("user").item]
    target = d.test.set_index("user").item.reindex(users).to_numpy()
    res: dict = {"dataset": "ml-100k", "users": d.n_users, "items": d.n_items, "train_interactions": len(d.train),
                 "protocol": "leave-last-out by time per user; full ranking over all items; seen items excluded"}
    pop = np.bincount(pd.concat([d.train, d.valid]).item, minlength=d.n_items).astype(float)
    res["popularity"] = full_ranking_metrics(np.tile(pop, (d.n_users, 1)), seen, target)
    tr = pd.concat([d.train, d.valid])  # the validation item trains too: nothing is tuned on it here
    bpr = train_bpr(tr, d.n_users, d.n_items, seed=seed)
    with torch.no_grad():
        res["bpr_mf"] = full_ranking_metrics((bpr.u.weight @ bpr.i.weight.T).numpy(), seen, target)
    # two-tower: items are their own "authors" (id embedding shared by both towers), title text, primary genre
    model = TwoTower(n_topics=max(len(d.genre_names), 1))
    posts = PostFeaturizer()(d.titles, np.arange(d.n_items), d.genre, np.zeros(d.n_items, dtype=np.int64))
    ui = _user_inputs(d, tr.user.to_numpy(), tr, exclude=tr.item.to_numpy())
    zeros = np.zeros(len(tr))
    train_two_tower(model, ui, subset_posts(posts, tr.item.to_numpy()), tr.item.to_numpy(), zeros, zeros, epochs=epochs,
                    batch=512, temperature=0.1, seed=seed, progress=progress)
    pe = embed_posts(model, posts)
    ue = embed_users(model, _user_inputs(d, users, tr))
    res["two_tower"] = full_ranking_metrics(ue @ pe.T, seen, target)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res
