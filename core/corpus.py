"""The corpus that training and the batch features read: users, posts, follows and the span of
time they cover, as observed by the platform (no latent truth).

A data directory holds it as ``corpus.npz`` beside its ``impressions``, ``engagements`` and
``posts`` Parquet tables. `feedrank sim generate` fills one today (the simulator's world is a
:class:`Corpus` plus its ground truth); the served-data lake fills the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CORPUS_FILE = "corpus.npz"
ARRAYS = ("post_author", "post_topic", "post_ctype", "post_flagged", "post_original", "post_ts",
          "follow_src", "follow_dst")


@dataclass(kw_only=True)
class Corpus:
    """Arrays indexed by post id and follow edge; user and post ids are dense from 0."""

    start_ms: int
    end_ms: int
    n_users: int
    n_topics: int
    post_author: np.ndarray         # [P]
    post_topic: np.ndarray          # [P]
    post_ctype: np.ndarray          # [P]
    post_flagged: np.ndarray        # [P] bool
    post_original: np.ndarray       # [P] bool
    post_ts: np.ndarray             # [P] publish time, epoch ms
    follow_src: np.ndarray          # [F] follower
    follow_dst: np.ndarray          # [F] followed author

    def __post_init__(self) -> None:
        self._reindex_follows()

    @property
    def n_posts(self) -> int:
        return int(self.post_author.shape[0])

    # ----------------------------------------------------------------- follows
    def _reindex_follows(self) -> None:
        key = self.follow_src.astype(np.int64) * self.n_users + self.follow_dst.astype(np.int64)
        order = np.argsort(key, kind="stable")
        self._follow_keys = key[order]
        self.follow_src, self.follow_dst = self.follow_src[order], self.follow_dst[order]
        self._follow_offsets = np.searchsorted(self.follow_src, np.arange(self.n_users + 1))

    def follows(self, users: np.ndarray, authors: np.ndarray) -> np.ndarray:
        """Vectorised "does user follow author" (broadcasting)."""
        key = np.asarray(users, dtype=np.int64) * self.n_users + np.asarray(authors, dtype=np.int64)
        if self._follow_keys.size == 0:
            return np.zeros(key.shape, dtype=bool)
        idx = np.searchsorted(self._follow_keys, key)
        idx = np.minimum(idx, self._follow_keys.size - 1)
        return self._follow_keys[idx] == key

    def following(self, user: int) -> np.ndarray:
        return self.follow_dst[self._follow_offsets[user]: self._follow_offsets[user + 1]]

    def follower_counts(self) -> np.ndarray:
        return np.bincount(self.follow_dst, minlength=self.n_users)

    # ----------------------------------------------------------------- persistence
    def save_corpus(self, directory: str | Path) -> Path:
        path = Path(directory) / CORPUS_FILE
        meta = np.array([self.start_ms, self.end_ms, self.n_users, self.n_topics], dtype=np.int64)
        np.savez_compressed(path, meta=meta, **{k: getattr(self, k) for k in ARRAYS})
        return path

    @classmethod
    def load_corpus(cls, directory: str | Path) -> "Corpus":
        path = Path(directory) / CORPUS_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: not a data directory, or one written by an older "
                                    f"feedrank (run `feedrank sim generate` again)")
        z = np.load(path)
        start, end, users, topics = (int(x) for x in z["meta"])
        return Corpus(start_ms=start, end_ms=end, n_users=users, n_topics=topics, **{k: z[k] for k in ARRAYS})
