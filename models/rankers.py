"""The light and heavy rankers.

Light: logistic regression over ~20 cheap features, scored in numpy (10K rows in well
under 2 ms). Heavy: a multi-gate mixture of experts (MMoE) over ~300 features with six
heads — click, like, comment, share, long dwell, negative — combined by configured
weights. Position bias is learned PAL-style: during training every head's probability
is ``P(examined | position) * P(head | examined)`` with a position tower shared by all
heads; serving uses only the position-free relevance ``P(head | examined)``, exported
with its feature normalisation as one TorchScript module that scores 500 rows per call.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.schema import HEAD_NAMES, HEAVY_SCHEMA_HASH

from models.inference import MAX_POSITION, UNCONFIGURED_FEATURE_CLIP, NumpyHeavy, sigmoid  # noqa: F401  (re-exported)
from models.store import require_schema


def _standardize_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    std = x.std(0)
    return mean.astype(np.float32), np.where(std < 1e-6, 1.0, std).astype(np.float32)


# ---------------------------------------------------------------------------- light


@dataclass
class LightRanker:
    w: np.ndarray
    b: float
    mean: np.ndarray
    std: np.ndarray

    def score(self, x: np.ndarray) -> np.ndarray:
        """Logit per row (monotone in P(click)); vectorised, no allocation beyond one matmul."""
        return ((x - self.mean) / self.std) @ self.w + self.b

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, w=self.w, b=np.float32(self.b), mean=self.mean, std=self.std)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LightRanker":
        z = np.load(io.BytesIO(data))
        return cls(z["w"], float(z["b"]), z["mean"], z["std"])

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, epochs: int = 30, l2: float = 1e-4, seed: int = 0,
            weight: np.ndarray | None = None) -> "LightRanker":
        """Logistic regression by full-batch L-BFGS on standardised features; ``weight`` per example (e.g.
        the inverse of a negative down-sampling rate) or None."""
        torch.manual_seed(seed)
        x = np.asarray(x, dtype=np.float32)
        mean, std = _standardize_stats(x)
        xt = torch.from_numpy((x - mean) / std)
        yt = torch.from_numpy(y.astype(np.float32))
        wt = None if weight is None else torch.from_numpy(np.asarray(weight, dtype=np.float32) / float(np.mean(weight)))
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=epochs, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(xt @ w + b, yt, weight=wt) + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(w.detach().numpy().astype(np.float32), float(b.detach()), mean, std)


# ---------------------------------------------------------------------------- heavy


class HeavyRanker(nn.Module):
    """MMoE with six heads and an optional PAL position tower (training only)."""

    def __init__(self, n_features: int, n_experts: int = 4, expert_dim: int = 64, hidden: int = 128,
                 position_aware: bool = True, feature_clip: float = UNCONFIGURED_FEATURE_CLIP):
        super().__init__()
        self.config = {"n_features": n_features, "n_experts": n_experts, "expert_dim": expert_dim, "hidden": hidden,
                       "position_aware": position_aware, "feature_clip": float(feature_clip)}
        self.feature_clip = float(feature_clip)
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.register_buffer("lo", torch.full((n_features,), -1e9))
        self.register_buffer("hi", torch.full((n_features,), 1e9))
        # 0 for feature columns the model is trained and served without (``training.heavy_masked``)
        self.register_buffer("input_mask", torch.ones(n_features))
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, expert_dim), nn.ReLU())
            for _ in range(n_experts))
        self.gates = nn.ModuleList(nn.Linear(n_features, n_experts) for _ in HEAD_NAMES)
        self.towers = nn.ModuleList(nn.Sequential(nn.Linear(expert_dim, 32), nn.ReLU()) for _ in HEAD_NAMES)
        # the final scoring layers, what the online learner updates: per head a linear layer
        # over its tower ("deep") plus one linear layer over the normalised features ("wide",
        # zero at start), so online updates can re-weight individual features, which is what a
        # trend shift needs (measured: the deep final layer alone recovered <0.1% of AUC)
        self.final = nn.ModuleList(nn.Linear(32, 1) for _ in HEAD_NAMES)
        self.wide = nn.Linear(n_features, len(HEAD_NAMES), bias=False)
        nn.init.zeros_(self.wide.weight)
        self.position = nn.Embedding(MAX_POSITION + 1, 1) if position_aware else None
        if self.position is not None:
            nn.init.constant_(self.position.weight, 2.0)

    def set_normalization(self, mean: np.ndarray, std: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        self.mean.copy_(torch.from_numpy(mean))
        self.std.copy_(torch.from_numpy(std))
        self.lo.copy_(torch.from_numpy(np.asarray(lo, dtype=np.float32)))
        self.hi.copy_(torch.from_numpy(np.asarray(hi, dtype=np.float32)))

    def set_input_mask(self, mask: np.ndarray) -> None:
        self.input_mask.copy_(torch.from_numpy(np.asarray(mask, dtype=np.float32)))

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """The one feature transform (the numpy twin is :meth:`models.inference.NumpyHeavy.normalized`):
        schema bounds, standardisation, then +- ``feature_clip`` standard deviations."""
        z = (torch.clamp(x, self.lo, self.hi) - self.mean) / self.std
        return torch.clamp(z, -self.feature_clip, self.feature_clip) * self.input_mask

    def hidden(self, x: torch.Tensor, z: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-head inputs of the final layer (features -> MMoE -> towers)."""
        z = self.normalized(x) if z is None else z
        ex = torch.stack([e(z) for e in self.experts], dim=1)  # [n, E, d]
        out = []
        for gate, tower in zip(self.gates, self.towers):
            g = torch.softmax(gate(z), dim=1).unsqueeze(2)
            out.append(tower((ex * g).sum(1)))
        return out

    def relevance_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 6] position-free logits of P(head | examined)."""
        z = self.normalized(x)
        return torch.cat([f(h) for f, h in zip(self.final, self.hidden(x, z))], dim=1) + self.wide(z)

    def training_logprobs(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """[n, 6] log P(head) as observed at ``position`` (PAL), or log P(head|examined) if position-blind."""
        rel = F.logsigmoid(self.relevance_logits(x))
        if self.position is None:
            return rel
        pos = torch.clamp(position, 0, MAX_POSITION)
        return rel + F.logsigmoid(self.position(pos))

    def examination_curve(self, positions: np.ndarray) -> np.ndarray:
        """Learned P(examined | position); ones for a position-blind model (which assumes every
        logged item was examined: the naive reading of clicks)."""
        if self.position is None:
            return np.ones(len(positions))
        with torch.no_grad():
            return torch.sigmoid(self.position(torch.from_numpy(np.asarray(positions, dtype=np.int64)))).numpy().ravel()


def _bce_from_logprob(logp: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy given log p (log1p(-p) computed stably), weighted per example if ``w``."""
    log1mp = torch.log1p(-torch.exp(torch.clamp(logp, max=-1e-6)))
    loss = -(y * logp + (1 - y) * log1mp)
    return (loss * w).mean() if w is not None else loss.mean()


def train_heavy(model: HeavyRanker, x: np.ndarray, y: np.ndarray, position: np.ndarray, epochs: int = 3,
                batch: int = 2048, lr: float = 2e-3, seed: int = 0, progress=None,
                head_weights: np.ndarray | None = None, weight: np.ndarray | None = None) -> list[float]:
    """Adam on the weighted sum of the heads' losses; ``weight`` per example (normalised to mean 1) or None."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    pt = torch.from_numpy(np.asarray(position, dtype=np.int64))
    wt = None if weight is None else torch.from_numpy(np.asarray(weight, dtype=np.float32) / float(np.mean(weight)))
    hw = torch.from_numpy(np.ones(len(HEAD_NAMES), dtype=np.float32) if head_weights is None else head_weights)
    # the position tower must travel several logits from its prior: give it its own step size
    pos_params = list(model.position.parameters()) if model.position is not None else []
    other = [p for p in model.parameters() if all(p is not q for q in pos_params)]
    groups = [{"params": other, "lr": lr}] + ([{"params": pos_params, "lr": 0.05}] if pos_params else [])
    opt = torch.optim.Adam(groups)
    n = x.shape[0]
    steps = max(1, n // batch)
    losses = []
    for ep in range(epochs):
        perm = torch.from_numpy(rng.permutation(n))
        total = 0.0
        for s in range(steps):
            idx = perm[s * batch: (s + 1) * batch]
            logp = model.training_logprobs(xt[idx], pt[idx])
            wi = None if wt is None else wt[idx]
            loss = sum(hw[j] * _bce_from_logprob(logp[:, j], yt[idx, j], wi) for j in range(len(HEAD_NAMES)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            if progress:
                progress((ep * steps + s + 1) / (epochs * steps))
        losses.append(total / steps)
    return losses


class ServingHeavy(nn.Module):
    """What serving runs: features [n, F] -> (P(head | examined) [n, 6], weighted score [n]).

    Columns the model is served without (``input_mask`` 0: ``training.heavy_masked``) are dropped
    before the first layers, whose weights are sliced to the kept columns (``keep``): the same
    output, but with 257 of 309 columns masked the first layers did ~5/6 of their multiply-adds
    for nothing (500 rows, 1 thread: 4.97 -> 2.54 ms p50 measured on the same weights)."""

    def __init__(self, model: HeavyRanker, weights: np.ndarray):
        super().__init__()
        keep = np.flatnonzero(model.input_mask.detach().numpy() != 0)
        self.model = _pruned(model, keep)
        self.register_buffer("keep", torch.from_numpy(keep.astype(np.int64)))
        self.register_buffer("weights", torch.from_numpy(np.asarray(weights, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.sigmoid(self.model.relevance_logits(x.index_select(1, self.keep)))
        return p, p @ self.weights


def _pruned(model: HeavyRanker, keep: np.ndarray) -> HeavyRanker:
    """A copy of ``model`` over the columns ``keep`` only (no position tower: serving is position-free)."""
    cfg = {**model.config, "n_features": len(keep), "position_aware": False}
    out = HeavyRanker(**cfg)
    k = torch.from_numpy(keep.astype(np.int64))
    state = {}
    for name, t in model.state_dict().items():
        if name.startswith("position."):
            continue
        if name in ("mean", "std", "lo", "hi", "input_mask"):
            t = t[k]
        elif name == "wide.weight" or (name.endswith(".weight") and name.split(".")[0] == "gates") \
                or (name.startswith("experts.") and name.endswith(".0.weight")):
            t = t[:, k]
        state[name] = t.detach().clone()
    out.load_state_dict(state)
    return out.eval()


def export_torchscript(model: HeavyRanker, weights: np.ndarray) -> bytes:
    model.eval()
    serving = ServingHeavy(model, weights).eval()
    example = torch.zeros(4, model.config["n_features"])
    with torch.no_grad():
        traced = torch.jit.trace(serving, example)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    model.train()
    return buf.getvalue()


def load_torchscript(data: bytes) -> torch.jit.ScriptModule:
    import warnings

    with warnings.catch_warnings():  # torch 2.13 marks jit.load deprecated; TorchScript is what serving runs
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(io.BytesIO(data))


def state_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({"config": model.config, "state": model.state_dict()}, buf)
    return buf.getvalue()


def heavy_from_bytes(data: bytes) -> HeavyRanker:
    blob = torch.load(io.BytesIO(data), weights_only=False)
    m = HeavyRanker(**blob["config"])
    missing, unexpected = m.load_state_dict(blob["state"], strict=False)
    if unexpected or any(k not in ("wide.weight", "input_mask") for k in missing):
        raise ValueError(f"heavy checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    return m  # an older checkpoint loads with the wide layer at zero and no column masked


# ------------------------------------------------------------------ numpy (streaming jobs)


def heavy_npz(model: HeavyRanker) -> bytes:
    """The heavy ranker's weights and config as plain numpy (``heavy.npz`` in a checkpoint):
    the online learner runs inside a PyFlink thread-mode worker, where torch never returns."""
    import json

    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    arrays["__config__"] = np.frombuffer(json.dumps(model.config).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def apply_final(serving: torch.jit.ScriptModule, final_npz: bytes) -> torch.jit.ScriptModule:
    """Overwrite the final layer of a TorchScript heavy ranker with online-learned weights
    (``final.npz`` of a checkpoint published by the online learner). The wide layer is over every
    feature column; a module exported over the kept columns takes those (older exports have all)."""
    z = np.load(io.BytesIO(final_npz))
    wide = z["wide"]
    if hasattr(serving, "keep"):
        wide = wide[:, serving.keep.numpy()]
    with torch.no_grad():
        for j in range(len(HEAD_NAMES)):
            layer = getattr(serving.model.final, str(j))
            layer.weight.copy_(torch.from_numpy(z["w"][j][None, :]))
            layer.bias.copy_(torch.from_numpy(z["b"][j: j + 1]))
        serving.model.wide.weight.copy_(torch.from_numpy(np.ascontiguousarray(wide)))
    return serving


def load_heavy_serving(store, version: str | None = None) -> tuple[torch.jit.ScriptModule, str]:
    """What serving scores with: heavy.ts of ``version`` (default current), with the online
    learner's final layer applied when the checkpoint carries one."""
    ck, path = store.fetch("heavy", version)
    require_schema(ck, HEAVY_SCHEMA_HASH)
    ts = load_torchscript((path / "heavy.ts").read_bytes())
    if (path / "final.npz").exists():
        apply_final(ts, (path / "final.npz").read_bytes())
    return ts, ck.version
