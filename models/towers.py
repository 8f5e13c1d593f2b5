"""Two-tower retrieval: a user tower and a post tower into one 128-d space.

Post tower: content only — hashed text unigrams + bigrams (EmbeddingBag), author,
topic, content type — so a post is embedded the moment it is published (cold start).
A precomputed dense text vector (e.g. a sentence encoder's) can replace the hashing
bag: pass ``text_dense`` and set ``text_dim``. User tower: the user's engagement
profile (topic / negative-feedback / content-type shares, activity) and the authors
they follow, pooled through the same author table the post tower uses.
Trained with in-batch sampled softmax and logQ correction for popularity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from features.offline import USER_DENSE_DIM

from models.inference import (AUTHOR_BUCKETS, TEXT_BUCKETS, NumpyTowers, PostArrays, TextHasher,  # noqa: F401
                              author_bucket)

MAX_FOLLOWS = 200


@dataclass
class PostInputs:
    text_ids: torch.Tensor
    text_offsets: torch.Tensor
    author: torch.Tensor
    topic: torch.Tensor
    ctype: torch.Tensor
    text_dense: torch.Tensor | None = None


@dataclass
class UserInputs:
    dense: torch.Tensor
    follow_ids: torch.Tensor
    follow_offsets: torch.Tensor


class TwoTower(nn.Module):
    """``author_dim`` defaults to 32 so checkpoints from before it was configurable load;
    training uses ``training.two_tower_author_dim``."""

    def __init__(self, n_topics: int = 24, dim: int = 128, text_dim: int = 0, hidden: int = 256, author_dim: int = 32):
        super().__init__()
        self.config = {"n_topics": n_topics, "dim": dim, "text_dim": text_dim, "hidden": hidden, "author_dim": author_dim}
        # sparse gradients: a step touches only the rows in the batch (dense Adam over these
        # tables was measured ~10x slower)
        self.author = nn.Embedding(AUTHOR_BUCKETS, author_dim, sparse=True)
        self.text = nn.EmbeddingBag(TEXT_BUCKETS, 64, mode="mean", sparse=True) if text_dim == 0 else None
        self.text_proj = nn.Linear(text_dim, 64) if text_dim else None
        self.topic = nn.Embedding(n_topics, 16)
        self.ctype = nn.Embedding(3, 8)
        self.post_mlp = nn.Sequential(nn.Linear(64 + author_dim + 16 + 8, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.user_mlp = nn.Sequential(nn.Linear(USER_DENSE_DIM + author_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        # score = u.p / temperature + recency * (publish_day - query_day): an exact 129th
        # inner-product coordinate, so the ANN index ranks fresh posts up as the truth does
        self.recency = nn.Parameter(torch.tensor(0.5))
        nn.init.normal_(self.author.weight, std=0.05)
        if self.text is not None:
            nn.init.normal_(self.text.weight, std=0.05)

    def post(self, x: PostInputs) -> torch.Tensor:
        txt = self.text_proj(x.text_dense) if self.text_proj is not None else self.text(x.text_ids, x.text_offsets)
        h = torch.cat([txt, self.author(x.author), self.topic(x.topic), self.ctype(x.ctype)], dim=1)
        return F.normalize(self.post_mlp(h), dim=1)

    def user(self, x: UserInputs) -> torch.Tensor:
        follows = F.embedding_bag(x.follow_ids, self.author.weight, x.follow_offsets, mode="mean", sparse=True)
        return F.normalize(self.user_mlp(torch.cat([x.dense, follows], dim=1)), dim=1)


# ---------------------------------------------------------------------- input builders


class PostFeaturizer(PostArrays):
    """Turns post attributes into PostInputs (used offline, at publish time and in serving)."""

    def __call__(self, texts: list[str], authors: np.ndarray, topics: np.ndarray, ctypes: np.ndarray) -> PostInputs:
        return PostInputs(*(torch.from_numpy(a) for a in self.arrays(texts, authors, topics, ctypes)))


def follows_bag(follow_src: np.ndarray, follow_dst: np.ndarray, users: np.ndarray, n_users: int,
                cap: int = MAX_FOLLOWS) -> tuple[torch.Tensor, torch.Tensor]:
    """EmbeddingBag ids/offsets of each user's followed authors (first ``cap``; a user with none gets a pad)."""
    order = np.argsort(follow_src, kind="stable")
    src, dst = follow_src[order], follow_dst[order]
    start = np.searchsorted(src, np.arange(n_users + 1))
    users = np.asarray(users, dtype=np.int64)
    lens = np.minimum(start[users + 1] - start[users], cap)
    lens_pad = np.maximum(lens, 1)
    offsets = np.concatenate([[0], np.cumsum(lens_pad)[:-1]]).astype(np.int64)
    ids = np.zeros(int(lens_pad.sum()), dtype=np.int64)  # bucket 0 doubles as "no follows"
    within = _within(lens)
    ids[np.repeat(offsets, lens) + within] = author_bucket(dst[np.repeat(start[users], lens) + within])
    return torch.from_numpy(ids), torch.from_numpy(offsets)


def _within(lens: np.ndarray) -> np.ndarray:
    """0..len-1 for each run of a ragged array, concatenated."""
    return np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)


def _repack(offsets: torch.Tensor, total: int, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index and new offsets selecting bags ``idx`` of an EmbeddingBag input."""
    offs = offsets.numpy()
    ends = np.append(offs[1:], total)
    starts = offs[idx]
    lens = ends[idx] - starts
    new_off = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return torch.from_numpy(np.repeat(starts, lens) + _within(lens)), torch.from_numpy(new_off)


def subset_posts(x: PostInputs, idx: np.ndarray) -> PostInputs:
    """Rows ``idx`` of a PostInputs batch (re-packing the text bag)."""
    gather, new_off = _repack(x.text_offsets, x.text_ids.numel(), idx)
    t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return PostInputs(x.text_ids[gather], new_off, x.author[t], x.topic[t], x.ctype[t],
                      None if x.text_dense is None else x.text_dense[t])


def subset_users(x: UserInputs, idx: np.ndarray) -> UserInputs:
    gather, new_off = _repack(x.follow_offsets, x.follow_ids.numel(), idx)
    t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return UserInputs(x.dense[t], x.follow_ids[gather], new_off)


# ---------------------------------------------------------------------- training


def train_two_tower(model: TwoTower, users: UserInputs, posts: PostInputs, post_ids: np.ndarray,
                    query_day: np.ndarray, publish_day: np.ndarray, epochs: int = 4, batch: int = 1024,
                    lr: float = 2e-3, temperature: float = 0.05, seed: int = 0, progress=None) -> list[float]:
    """In-batch sampled softmax with logQ correction. Row i of users/posts is a positive pair.

    In-batch negatives published after the query time are masked (they did not exist yet).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = post_ids.size
    counts = np.bincount(np.unique(post_ids, return_inverse=True)[1])
    freq = counts[np.unique(post_ids, return_inverse=True)[1]] / n  # sampling probability of each row's post
    logq = torch.from_numpy(np.log(freq).astype(np.float32))
    pid = torch.from_numpy(post_ids.astype(np.int64))
    qd = torch.from_numpy(np.asarray(query_day, dtype=np.float32))
    pd_ = torch.from_numpy(np.asarray(publish_day, dtype=np.float32))
    model.config["temperature"] = temperature
    sparse = [model.author.weight] + ([model.text.weight] if model.text is not None else [])
    dense = [p for p in model.parameters() if all(p is not q for q in sparse)]
    opts = [torch.optim.SparseAdam(sparse, lr=lr), torch.optim.Adam(dense, lr=lr)]
    losses = []
    steps = max(1, n // batch)
    for ep in range(epochs):
        perm = rng.permutation(n)
        total = 0.0
        for s in range(steps):
            idx = perm[s * batch: (s + 1) * batch]
            u = model.user(subset_users(users, idx))
            p = model.post(subset_posts(posts, idx))
            age = pd_[idx][None, :] - qd[idx][:, None]  # <= 0 for posts that existed
            logits = u @ p.T / temperature + model.recency * age - logq[idx][None, :]
            same = pid[idx][None, :] == pid[idx][:, None]
            invalid = (same | (age > 0)) & ~torch.eye(len(idx), dtype=torch.bool)
            logits = logits.masked_fill(invalid, float("-inf"))
            loss = F.cross_entropy(logits, torch.arange(len(idx)))
            for o in opts:
                o.zero_grad()
            loss.backward()
            for o in opts:
                o.step()
            total += float(loss.detach())
            if progress:
                progress((ep * steps + s + 1) / (epochs * steps))
        losses.append(total / steps)
    return losses


@torch.no_grad()
def _embed(model: TwoTower, tower, inputs, subset, n: int, batch: int) -> np.ndarray:
    """Run one tower over ``n`` rows in batches, in eval mode."""
    model.eval()
    out = np.zeros((n, model.config["dim"]), dtype=np.float32)
    for i in range(0, n, batch):
        idx = np.arange(i, min(i + batch, n))
        out[idx] = tower(subset(inputs, idx)).numpy()
    model.train()
    return out


def embed_posts(model: TwoTower, posts: PostInputs, batch: int = 8192) -> np.ndarray:
    return _embed(model, model.post, posts, subset_posts, posts.author.numel(), batch)


def embed_users(model: TwoTower, users: UserInputs, batch: int = 8192) -> np.ndarray:
    return _embed(model, model.user, users, subset_users, users.dense.shape[0], batch)
