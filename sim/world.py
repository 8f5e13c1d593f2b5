"""The simulated world's state: users, creators, posts, follows and their latent truth.

A :class:`World` is what the generator writes and what evaluations load. It answers
"how good is this post for this user at time t" (:meth:`World.true_utility`) and
"what is the best order" (:meth:`World.oracle_ranking`), using only the formulas in
:mod:`sim.truth`. New posts published during a live simulation are appended in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.corpus import Corpus
from core.units import DAY_MS
from sim import truth

TOPIC_NAMES = [
    "sports", "politics", "cooking", "travel", "music", "movies", "gaming", "tech",
    "science", "fashion", "fitness", "finance", "art", "books", "pets", "parenting",
    "comedy", "news", "cars", "diy", "gardening", "crypto", "health", "photography",
]

#: Head weights of the ground-truth utility (the same defaults as feedrank.toml [heads]).
@dataclass(frozen=True)
class UtilityWeights:
    click: float = 1.0
    like: float = 2.0
    comment: float = 4.0
    share: float = 6.0
    long_dwell: float = 3.0
    negative: float = -8.0
    long_dwell_ms: float = 30_000.0

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("click", "like", "comment", "share", "long_dwell", "negative")}


@dataclass
class TrendShift:
    topic: int
    at_ms: int
    boost: float


@dataclass(kw_only=True)
class World(Corpus):
    """The corpus plus its latent truth: arrays indexed by user id / post id (ids are dense from 0)."""

    seed: int
    eta: float
    topic_pref: np.ndarray          # [U, T] latent topic affinity
    ctype_pref: np.ndarray          # [U, 3]
    activity: np.ndarray            # [U] relative session rate
    is_creator: np.ndarray          # [U] bool
    creator_quality: np.ndarray     # [U] (0 for non-creators)
    creator_topic: np.ndarray       # [U] main topic (-1 for non-creators)
    post_quality: np.ndarray        # [P]
    trends: list[TrendShift] = field(default_factory=list)
    weights: UtilityWeights = field(default_factory=UtilityWeights)
    vocab: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype="<U1"))  # [T+1, V]; row T shared

    def add_follow(self, user: int, author: int) -> bool:
        if user == author or bool(self.follows(np.array(user), np.array(author))):
            return False
        self.follow_src = np.append(self.follow_src, np.int64(user))
        self.follow_dst = np.append(self.follow_dst, np.int64(author))
        self._reindex_follows()
        return True

    def trend_boost(self, topics: np.ndarray, t_ms: np.ndarray | int) -> np.ndarray:
        out = np.zeros(np.broadcast(np.asarray(topics), np.asarray(t_ms)).shape)
        for s in self.trends:
            out = out + np.where((np.asarray(topics) == s.topic) & (np.asarray(t_ms) >= s.at_ms), s.boost, 0.0)
        return out

    def logit(self, users: np.ndarray, posts: np.ndarray, t_ms: np.ndarray | int | None = None) -> np.ndarray:
        """The latent engagement logit z(u, p, t); broadcasts users against posts."""
        users = np.asarray(users, dtype=np.int64)
        posts = np.asarray(posts, dtype=np.int64)
        t = self.end_ms if t_ms is None else np.asarray(t_ms, dtype=np.int64)
        topic = self.post_topic[posts]
        ctype = self.post_ctype[posts]
        author = self.post_author[posts]
        age_days = np.maximum(t - self.post_ts[posts], 0) / DAY_MS
        return (
            truth.BIAS
            + truth.TOPIC_W * self.topic_pref[users, topic]
            + truth.CTYPE_W * self.ctype_pref[users, ctype]
            + self.creator_quality[author]
            + self.post_quality[posts]
            + truth.FOLLOW_W * self.follows(users, author)
            + self.trend_boost(topic, t)
            + truth.BAIT * self.post_flagged[posts]
            - truth.AGE_W * age_days
        )

    def head_probs(self, users: np.ndarray, posts: np.ndarray, t_ms: np.ndarray | int | None = None) -> dict[str, np.ndarray]:
        z = self.logit(users, posts, t_ms)
        posts = np.broadcast_to(np.asarray(posts), z.shape)
        return truth.head_probs(z, self.post_ctype[posts], self.post_flagged[posts].astype(np.float64), self.weights.long_dwell_ms)

    def true_utility(self, users: np.ndarray | int, posts: np.ndarray, t_ms: np.ndarray | int | None = None) -> np.ndarray:
        """Expected weighted engagement of showing each post (given it is examined)."""
        probs = self.head_probs(np.asarray(users), np.asarray(posts), t_ms)
        w = self.weights.as_dict()
        return sum(w[h] * p for h, p in probs.items())

    def oracle_ranking(self, user: int, posts: np.ndarray, t_ms: int | None = None, k: int | None = None) -> np.ndarray:
        """Posts in descending true utility (the best possible order)."""
        posts = np.asarray(posts)
        order = np.argsort(-self.true_utility(user, posts, t_ms), kind="stable")
        return posts[order[:k] if k else order]

    def examination_prob(self, positions: np.ndarray) -> np.ndarray:
        return truth.examination(positions, self.eta)

    # ----------------------------------------------------------------- live posts
    def add_post(self, author: int, topic: int, ctype: int, quality: float, flagged: bool, original: bool, ts_ms: int) -> int:
        """Append a post published during a live simulation; returns its id."""
        pid = self.n_posts
        self.post_author = np.append(self.post_author, np.int64(author))
        self.post_topic = np.append(self.post_topic, np.int16(topic))
        self.post_ctype = np.append(self.post_ctype, np.int8(ctype))
        self.post_quality = np.append(self.post_quality, np.float32(quality))
        self.post_flagged = np.append(self.post_flagged, bool(flagged))
        self.post_original = np.append(self.post_original, bool(original))
        self.post_ts = np.append(self.post_ts, np.int64(ts_ms))
        return pid

    def make_text(self, topic: int, rng: np.random.Generator, n_words: int = 14) -> str:
        """Text for a new post: mostly words of its topic's vocabulary."""
        rows = np.where(rng.random(n_words) < 0.7, topic, self.vocab.shape[0] - 1)
        return " ".join(self.vocab[rows, rng.integers(0, self.vocab.shape[1], size=n_words)])

    # ----------------------------------------------------------------- persistence
    _ARRAYS = (
        "topic_pref", "ctype_pref", "activity", "is_creator", "creator_quality", "creator_topic",
        "post_author", "post_topic", "post_ctype", "post_quality", "post_flagged", "post_original",
        "post_ts", "follow_src", "follow_dst",
    )

    def save(self, path: str | Path) -> None:
        arrays = {k: getattr(self, k) for k in self._ARRAYS}
        trends = np.array([[s.topic, s.at_ms, s.boost] for s in self.trends], dtype=np.float64).reshape(-1, 3)
        meta = np.array([self.seed, self.start_ms, self.end_ms], dtype=np.int64)
        np.savez_compressed(path, meta=meta, eta=np.float64(self.eta), trends=trends, vocab=self.vocab, **arrays)

    @classmethod
    def load(cls, path: str | Path, weights: UtilityWeights | None = None) -> "World":
        p = Path(path)
        if p.is_dir():
            p = p / "ground_truth.npz"
        z = np.load(p)
        seed, start, end = (int(x) for x in z["meta"])
        trends = [TrendShift(int(t), int(a), float(b)) for t, a, b in z["trends"]]
        return cls(
            seed=seed, start_ms=start, end_ms=end, eta=float(z["eta"]), trends=trends,
            n_users=int(z["topic_pref"].shape[0]), n_topics=int(z["topic_pref"].shape[1]),
            weights=weights or UtilityWeights(), vocab=z["vocab"], **{k: z[k] for k in cls._ARRAYS},
        )
