"""Training and evaluation data from a data directory (:mod:`core.corpus` and its logged
impressions and engagements), split by time (never at random).

Everything before ``split`` trains, everything after validates. Features are computed
point-in-time (:mod:`features.offline`), so validation rows see only their own past.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from features.offline import History, labels
from models.towers import PostFeaturizer, PostInputs, TwoTower, UserInputs, embed_users, follows_bag
from core.corpus import Corpus
from core.units import DAY_MS


@dataclass
class SimData:
    data_dir: Path
    world: Corpus
    history: History
    impressions: pd.DataFrame
    engagements: pd.DataFrame
    labels: np.ndarray          # [n_impressions, 6]
    posts_text: list[str]
    split_ms: int

    @classmethod
    def load(cls, data_dir: str | Path, valid_days: float = 3.0) -> "SimData":
        d = Path(data_dir)
        world = Corpus.load_corpus(d)
        imp = pq.read_table(d / "impressions.parquet").to_pandas()
        eng = pq.read_table(d / "engagements.parquet").to_pandas()
        hist = History(world, imp, eng)
        text = pq.read_table(d / "posts.parquet", columns=["text"]).column("text").to_pylist()
        split = int(world.end_ms - valid_days * DAY_MS)
        return cls(d, world, hist, imp, eng, labels(imp, eng), text, split)

    @property
    def train_mask(self) -> np.ndarray:
        return self.impressions["ts"].to_numpy() < self.split_ms

    @property
    def window(self) -> dict:
        return {"train_from_ms": int(self.world.start_ms), "train_to_ms": self.split_ms,
                "valid_to_ms": int(self.world.end_ms), "data_dir": str(self.data_dir)}

    def post_inputs(self, featurizer: PostFeaturizer | None = None) -> PostInputs:
        w = self.world
        return (featurizer or PostFeaturizer())(self.posts_text, w.post_author, w.post_topic, w.post_ctype)

    def user_inputs(self, users: np.ndarray, t: np.ndarray) -> UserInputs:
        st = self.history.user_state(users, t)
        ids, offs = follows_bag(self.world.follow_src, self.world.follow_dst, users, self.world.n_users)
        return UserInputs(torch.from_numpy(st.dense()), ids, offs)

    def user_embeddings(self, model: TwoTower, users: np.ndarray, t: np.ndarray, chunk: int = 100_000) -> np.ndarray:
        out = [embed_users(model, self.user_inputs(users[i: i + chunk], t[i: i + chunk]))
               for i in range(0, users.size, chunk)]
        return np.vstack(out) if out else np.zeros((0, model.config["dim"]), dtype=np.float32)

    def sample_rows(self, mask: np.ndarray, n: int, seed: int) -> np.ndarray:
        idx = np.flatnonzero(mask)
        if idx.size > n:
            idx = np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))
        return idx
