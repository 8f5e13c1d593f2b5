"""Inference without torch: what the PyFlink jobs run (and serving may reuse).

Inside PyFlink's thread-mode interpreter torch must not be touched: its MKL matmul never
returns there, and importing it from two operators opening at the same time deadlocked the
feature job's start (measured: the post operator stuck in INITIALIZING for minutes, its
``open`` never finishing). Everything here is numpy; :mod:`models.towers` and
:mod:`models.rankers` (torch) re-export it, and ``towers_test`` / ``rankers_test`` check these
copies match the torch models.
"""

from __future__ import annotations

import io
import zlib
from typing import Any

import numpy as np

from core.schema import HEAD_NAMES

TEXT_BUCKETS = 1 << 18
AUTHOR_BUCKETS = 1 << 17
MAX_POSITION = 64


class TextHasher:
    """Stable (crc32) hashing of unigrams and bigrams into buckets; caches word hashes."""

    def __init__(self, buckets: int = TEXT_BUCKETS):
        self.buckets = buckets
        self._cache: dict[str, int] = {}

    def _h(self, w: str) -> int:
        h = self._cache.get(w)
        if h is None:
            h = zlib.crc32(w.encode())
            self._cache[w] = h
        return h

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids: list[int] = []
        offsets = np.zeros(len(texts), dtype=np.int64)
        b = self.buckets
        for i, text in enumerate(texts):
            offsets[i] = len(ids)
            hs = [self._h(w) for w in text.lower().split()] or [0]
            ids.extend(h % b for h in hs)
            ids.extend((hs[j] * 1_000_003 + hs[j + 1]) % b for j in range(len(hs) - 1))
        return np.asarray(ids, dtype=np.int64), offsets


def author_bucket(author_ids: np.ndarray) -> np.ndarray:
    return (np.asarray(author_ids, dtype=np.int64) * 2_654_435_761) % AUTHOR_BUCKETS


class PostArrays:
    """Post attributes -> the post tower's numpy inputs (hashed text, author bucket, topic, type)."""

    def __init__(self) -> None:
        self.hasher = TextHasher()

    def arrays(self, texts: list[str], authors: np.ndarray, topics: np.ndarray,
               ctypes: np.ndarray) -> tuple[np.ndarray, ...]:
        """(text ids, text offsets, author buckets, topics, content types) as numpy."""
        ids, offs = self.hasher(texts)
        return (ids, offs, author_bucket(authors), np.asarray(topics, dtype=np.int64), np.asarray(ctypes, dtype=np.int64))


def _bag_mean(table: np.ndarray, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """EmbeddingBag(mode='mean') in numpy; every bag is non-empty (the builders pad)."""
    sums = np.add.reduceat(table[ids], offsets, axis=0)
    lens = np.diff(np.append(offsets, ids.size))
    return sums / lens[:, None]


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class NumpyTowers:
    """The towers' forward pass in numpy, for the streaming jobs.

    Torch's MKL matmul never returns inside PyFlink's thread-mode interpreter (measured:
    ``nn.Linear`` on a 1x4 input blocks forever, elementwise ops work), so the feature job
    embeds posts and users with these copies of the weights. ``towers_test`` checks they
    match the torch model to 1e-5.
    """

    def __init__(self, sd: dict[str, np.ndarray]):
        """From :meth:`arrays` (``towers.npz`` in a two_tower checkpoint). Inside a thread-mode
        worker neither building a torch module nor ``torch.load`` returns either, so the
        checkpoint carries the weights as plain numpy as well."""
        if "text.weight" not in sd:
            raise ValueError("NumpyTowers supports the hashed-text post tower only")
        self.text, self.author, self.topic, self.ctype = sd["text.weight"], sd["author.weight"], sd["topic.weight"], sd["ctype.weight"]
        self.post_mlp = [(sd["post_mlp.0.weight"].T.copy(), sd["post_mlp.0.bias"]), (sd["post_mlp.2.weight"].T.copy(), sd["post_mlp.2.bias"])]
        self.user_mlp = [(sd["user_mlp.0.weight"].T.copy(), sd["user_mlp.0.bias"]), (sd["user_mlp.2.weight"].T.copy(), sd["user_mlp.2.bias"])]

    @staticmethod
    def arrays(model: Any) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    @staticmethod
    def npz(model: Any) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **NumpyTowers.arrays(model))
        return buf.getvalue()

    @classmethod
    def from_npz(cls, path_or_bytes: Any) -> "NumpyTowers":
        src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
        with np.load(src) as z:
            return cls({k: z[k] for k in z.files})

    @staticmethod
    def _mlp(layers: list[tuple[np.ndarray, np.ndarray]], h: np.ndarray) -> np.ndarray:
        (w1, b1), (w2, b2) = layers
        return np.maximum(h @ w1 + b1, 0.0) @ w2 + b2

    def post(self, x: tuple[np.ndarray, ...]) -> np.ndarray:
        """``x`` = :meth:`PostFeaturizer.arrays` (numpy only: no torch tensor may be touched in a worker)."""
        ids, offs, author, topic, ctype = x
        txt = _bag_mean(self.text, ids, offs)
        h = np.hstack([txt, self.author[author], self.topic[topic], self.ctype[ctype]])
        return _normalize(self._mlp(self.post_mlp, h.astype(np.float32))).astype(np.float32)

    def user(self, dense: np.ndarray, follow_ids: np.ndarray, follow_offsets: np.ndarray) -> np.ndarray:
        follows = _bag_mean(self.author, follow_ids, follow_offsets)
        h = np.hstack([dense, follows]).astype(np.float32)
        return _normalize(self._mlp(self.user_mlp, h)).astype(np.float32)


def load_numpy_towers(store: Any, version: str | None = None) -> NumpyTowers:
    """The towers of ``version`` as :class:`models.towers.NumpyTowers` (no torch: for the Flink jobs)."""
    _, path = store.fetch("two_tower", version)
    if not (path / "towers.npz").exists():
        raise FileNotFoundError(f"two_tower {version} has no towers.npz (published by an older feedrank): "
                                "run `feedrank train two-tower` again")
    return NumpyTowers.from_npz(str(path / "towers.npz"))


#: The standardised-feature clip of a heavy ranker built without one (checkpoints from before
#: ``training.heavy_feature_clip`` existed were trained and served with it).
UNCONFIGURED_FEATURE_CLIP = 8.0


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


class NumpyHeavy:
    """The heavy ranker's forward pass in numpy, split at the final layer.

    ``hidden(x)`` -> [n, heads, 32] is fixed; ``final_w`` [heads, 32] / ``final_b`` [heads]
    are what the online learner updates (only they change between an offline checkpoint and
    its online descendants, so hidden activations are computed once per example).
    """

    def __init__(self, arrays: dict[str, np.ndarray]):
        import json

        self.arrays = dict(arrays)
        self.config = json.loads(bytes(arrays["__config__"]).decode())
        a = self.arrays
        self.mean, self.std, self.lo, self.hi = a["mean"], a["std"], a["lo"], a["hi"]
        self.input_mask = a["input_mask"] if "input_mask" in a else np.ones_like(self.mean)
        self.n_experts = self.config["n_experts"]
        self.feature_clip = float(self.config.get("feature_clip", UNCONFIGURED_FEATURE_CLIP))
        self.final_w = np.stack([a[f"final.{j}.weight"][0] for j in range(len(HEAD_NAMES))]).astype(np.float64)
        self.final_b = np.array([a[f"final.{j}.bias"][0] for j in range(len(HEAD_NAMES))], dtype=np.float64)
        self.wide = a["wide.weight"].astype(np.float64) if "wide.weight" in a else np.zeros((len(HEAD_NAMES), self.mean.size))

    @classmethod
    def from_npz(cls, src: bytes | str) -> "NumpyHeavy":
        with np.load(io.BytesIO(src) if isinstance(src, bytes) else src) as z:
            return cls({k: z[k] for k in z.files})

    def examination(self, positions: np.ndarray) -> np.ndarray:
        """Learned P(examined | position) of the PAL tower (ones for a position-blind model)."""
        if "position.weight" not in self.arrays:
            return np.ones(len(positions))
        w = self.arrays["position.weight"][:, 0]
        return sigmoid(w[np.clip(np.asarray(positions, dtype=np.int64), 0, MAX_POSITION)].astype(np.float64))

    def normalized(self, x: np.ndarray) -> np.ndarray:
        """[n, F] standardised features: the same transform as serving's
        (:meth:`models.rankers.HeavyRanker.normalized`), so what the learner validates is what serves."""
        x = np.clip(np.asarray(x, dtype=np.float32), self.lo, self.hi)
        return np.clip((x - self.mean) / self.std, -self.feature_clip, self.feature_clip) * self.input_mask

    def hidden(self, x: np.ndarray | None, z: np.ndarray | None = None) -> np.ndarray:
        """[n, heads, 32] tower outputs: the deep inputs of the final layer."""
        a = self.arrays
        z = self.normalized(x) if z is None else z
        ex = []
        for e in range(self.n_experts):
            h = np.maximum(z @ a[f"experts.{e}.0.weight"].T + a[f"experts.{e}.0.bias"], 0)
            ex.append(np.maximum(h @ a[f"experts.{e}.2.weight"].T + a[f"experts.{e}.2.bias"], 0))
        ex_s = np.stack(ex, axis=1)  # [n, E, d]
        out = []
        for j in range(len(HEAD_NAMES)):
            g = z @ a[f"gates.{j}.weight"].T + a[f"gates.{j}.bias"]
            g = np.exp(g - g.max(1, keepdims=True))
            g /= g.sum(1, keepdims=True)
            mix = (ex_s * g[:, :, None]).sum(1)
            out.append(np.maximum(mix @ a[f"towers.{j}.0.weight"].T + a[f"towers.{j}.0.bias"], 0))
        return np.stack(out, axis=1).astype(np.float64)

    def score(self, x: np.ndarray) -> np.ndarray:
        """[n, heads] relevance logits of raw feature rows."""
        z = self.normalized(x)
        return self.logits(self.hidden(x, z=z), z)

    def logits(self, h: np.ndarray, z: np.ndarray, w: np.ndarray | None = None, b: np.ndarray | None = None,
               wide: np.ndarray | None = None) -> np.ndarray:
        """[n, heads] relevance logits from tower outputs and normalised features (optionally
        with other final-layer weights)."""
        w = self.final_w if w is None else w
        b = self.final_b if b is None else b
        wide = self.wide if wide is None else wide
        return np.einsum("nhd,hd->nh", h, w) + z @ wide.T + b

    def with_final(self, w: np.ndarray, b: np.ndarray, wide: np.ndarray | None = None) -> "NumpyHeavy":
        arrays = dict(self.arrays)
        for j in range(len(HEAD_NAMES)):
            arrays[f"final.{j}.weight"] = w[j][None, :].astype(np.float32)
            arrays[f"final.{j}.bias"] = np.array([b[j]], dtype=np.float32)
        arrays["wide.weight"] = (self.wide if wide is None else wide).astype(np.float32)
        return NumpyHeavy(arrays)

    def to_npz(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self.arrays)
        return buf.getvalue()

    def final_npz(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, w=self.final_w.astype(np.float32), b=self.final_b.astype(np.float32),
                 wide=self.wide.astype(np.float32))
        return buf.getvalue()
