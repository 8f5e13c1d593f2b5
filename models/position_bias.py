"""Estimate P(examined | position) from any click log with positions: regression-EM.

Model: ``P(click) = theta[position] * gamma(x)`` — a click needs the item examined
(position only) and relevant (features only). EM alternates: the E-step gives, for
every non-click, the posterior that it was examined-but-irrelevant vs unexamined; the
M-step sets ``theta`` to the mean examination posterior per position and refits the
relevance model ``gamma`` (a small MLP) on the relevance posteriors (Wang et al.,
WSDM 2018). Output is relative to position 1, the curve propensity weighting needs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class _Relevance(nn.Module):
    """gamma(x, user, post): features plus per-user and per-post effects.

    The logging policy placed items by relevance it knew better than our features do;
    per-post and per-user effects soak up that unobserved quality, which would otherwise
    be mistaken for position bias.
    """

    def __init__(self, n_features: int, n_users: int, n_posts: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_features, 64), nn.ReLU(), nn.Linear(64, 1))
        self.user = nn.Embedding(max(n_users, 1), 1)
        self.post = nn.Embedding(max(n_posts, 1), 1)
        nn.init.zeros_(self.user.weight)
        nn.init.zeros_(self.post.weight)

    def forward(self, x: torch.Tensor, u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(1) + self.user(u).squeeze(1) + self.post(p).squeeze(1)


def regression_em(positions: np.ndarray, clicks: np.ndarray, features: np.ndarray, n_positions: int = 20,
                  iters: int = 160, epochs_per_iter: int = 1, batch: int = 8192, seed: int = 0,
                  progress=None, users: np.ndarray | None = None, posts: np.ndarray | None = None,
                  tol: float = 1e-5) -> dict:
    """``features`` should be what the *logging policy* ranked by: given those, position is
    independent of relevance, so theta is identified. Iterates until the relative curve
    moves less than ``tol`` in one iteration (EM converges slowly here: ~100+ iterations).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    keep = positions <= n_positions
    pos = positions[keep].astype(np.int64) - 1
    c = clicks[keep].astype(np.float32)
    mean, std = features[keep].mean(0), features[keep].std(0) + 1e-6
    x = torch.from_numpy(((features[keep] - mean) / std).astype(np.float32))
    ctr = np.bincount(pos, weights=c, minlength=n_positions) / np.maximum(np.bincount(pos, minlength=n_positions), 1)
    theta = np.clip(ctr / ctr[0], 1e-3, 1.0)  # start from the naive CTR curve
    n = c.size
    uid = np.unique(users[keep], return_inverse=True)[1] if users is not None else np.zeros(n, dtype=np.int64)
    pid = np.unique(posts[keep], return_inverse=True)[1] if posts is not None else np.zeros(n, dtype=np.int64)
    ut, pt = torch.from_numpy(uid.astype(np.int64)), torch.from_numpy(pid.astype(np.int64))
    net = _Relevance(x.shape[1], int(uid.max()) + 1, int(pid.max()) + 1)
    opt = torch.optim.Adam([{"params": net.mlp.parameters(), "lr": 3e-3},
                            {"params": list(net.user.parameters()) + list(net.post.parameters()), "lr": 3e-2}])
    gamma = np.full(c.shape, float(c.mean()) / float(theta.mean()), dtype=np.float32).clip(1e-4, 1 - 1e-4)
    history = []
    for it in range(iters):
        th = theta[pos]
        denom = np.maximum(1.0 - th * gamma, 1e-9)
        p_exam = np.where(c > 0, 1.0, th * (1 - gamma) / denom)
        p_rel = np.where(c > 0, 1.0, (1 - th) * gamma / denom).astype(np.float32)
        theta = np.bincount(pos, weights=p_exam, minlength=n_positions) / np.bincount(pos, minlength=n_positions)
        target = torch.from_numpy(p_rel)
        for _ in range(epochs_per_iter):
            perm = torch.from_numpy(rng.permutation(n))
            for s in range(0, n, batch):
                idx = perm[s: s + batch]
                loss = F.binary_cross_entropy_with_logits(net(x[idx], ut[idx], pt[idx]), target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            gamma = torch.sigmoid(net(x, ut, pt)).numpy().clip(1e-4, 1 - 1e-4)
        history.append((theta / theta[0]).round(4).tolist())
        if progress:
            progress((it + 1) / iters)
        if it >= 2 and np.abs(np.array(history[-1]) - np.array(history[-2])).max() < tol:
            break
    return {"relative": (theta / theta[0]).tolist(), "absolute": theta.tolist(), "naive_ctr_curve": (ctr / ctr[0]).tolist(),
            "iterations": len(history), "converged": len(history) < iters, "history": history[-5:]}
