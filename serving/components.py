"""The funnel's vocabulary, product-mixer style: a :class:`Query`, columnar
:class:`Candidates`, and the six kinds of component a pipeline is assembled from.

* ``CandidateSource`` — fetches candidate ids (run in parallel, each with a timeout);
* ``Filter`` — returns which candidates are kept (and so which are removed, for debugging);
* ``FeatureHydrator`` — attaches feature columns;
* ``Scorer`` — writes score columns and declares them in ``writes``;
* ``Selector`` — reorders / truncates (top-k, re-rank rules);
* ``SideEffect`` — runs after the page is chosen (exposure logging, seen-set updates).

Candidates are columns of numpy arrays, not objects: 10K candidates per request pass
through every stage, and per-object Python would cost more than the whole budget.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from core.events import ContentType, Source
from serving.protos import pb

# Source codes: the proto's Source enum values, named as the events name them (core.events.Source)
IN_NETWORK, OUT_OF_NETWORK, AD, TRENDING = pb.IN_NETWORK, pb.OUT_OF_NETWORK, pb.AD, pb.TRENDING
SOURCE_NAMES = {code: Source[pb.Source.Name(code)].value for code in (IN_NETWORK, OUT_OF_NETWORK, AD, TRENDING)}
# Content types: the proto's ContentType code of each core.events.ContentType (same names)
CONTENT_TYPE_CODES = {c: pb.ContentType.Value(c.name) for c in ContentType}


@dataclass
class UserContext:
    """Everything known about the requesting user, read once per request."""

    user_id: int
    following: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # sorted author ids
    topic_clicks: np.ndarray = field(default_factory=lambda: np.zeros(24, dtype=np.float32))
    topic_negative: np.ndarray = field(default_factory=lambda: np.zeros(24, dtype=np.float32))
    ctype_clicks: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.float32))
    clicks: int = 0
    negatives: int = 0
    embedding: np.ndarray | None = None
    embedding_source: str = "none"      # feast | tower | none
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # sorted post ids
    hidden_posts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    blocked_authors: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    fatigue_authors: dict[int, float] = field(default_factory=dict)  # decayed suppression weight in [0, 1]
    fatigue_topics: dict[int, float] = field(default_factory=dict)
    affinity: dict[int, int] = field(default_factory=dict)           # author -> past engagements
    cached_candidates: np.ndarray | None = None                      # fan-out cache (None = miss)


@dataclass
class Query:
    request_id: str
    user_id: int
    feed_type: str                      # home | explore | following
    now_ms: int
    limit: int
    params: Any                         # serving.experiments.Params: effective settings after experiments
    experiments: dict[str, str]
    deadline: float                     # time.monotonic() by which the answer must be sent
    user: UserContext | None = None
    degraded: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    source_counts: dict[str, int] = field(default_factory=dict)
    debug_post: int | None = None
    trace: list[dict[str, Any]] = field(default_factory=list)  # DebugRanking: what happened to debug_post
    model_version: str = ""

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def degrade(self, reason: str) -> None:
        if reason not in self.degraded:
            self.degraded.append(reason)


class Candidates:
    """Columnar candidates: ``ids``, ``source`` and any named columns of equal length."""

    def __init__(self, ids: np.ndarray, source: np.ndarray, **cols: np.ndarray):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.source = np.asarray(source, dtype=np.int8)
        self.cols: dict[str, np.ndarray] = dict(cols)

    @classmethod
    def empty(cls) -> "Candidates":
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int8))

    def __len__(self) -> int:
        return int(self.ids.size)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        if len(value) != len(self):
            raise ValueError(f"column {name}: {len(value)} values for {len(self)} candidates")
        self.cols[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self.cols

    def take(self, idx: np.ndarray) -> "Candidates":
        return Candidates(self.ids[idx], self.source[idx], **{k: v[idx] for k, v in self.cols.items()})

    @staticmethod
    def concat(parts: list["Candidates"]) -> "Candidates":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Candidates.empty()
        proto: dict[str, np.ndarray] = {}
        for p in parts:
            for n, v in p.cols.items():
                proto.setdefault(n, v)

        def col(p: "Candidates", n: str) -> np.ndarray:
            if n in p.cols:
                return p.cols[n]
            v = proto[n]  # a column only some sources write (e.g. an ad's bid): zeros elsewhere
            return np.zeros((len(p),) + v.shape[1:], dtype=v.dtype)

        return Candidates(np.concatenate([p.ids for p in parts]), np.concatenate([p.source for p in parts]),
                          **{n: np.concatenate([col(p, n) for p in parts]) for n in proto})

    def index_of(self, post_id: int) -> int | None:
        hit = np.flatnonzero(self.ids == post_id)
        return int(hit[0]) if hit.size else None


class Component(ABC):
    """Base of every funnel component: a name for metrics, traces and DebugRanking."""

    kind: ClassVar[str] = "component"

    @property
    def name(self) -> str:
        return type(self).__name__


class CandidateSource(Component):
    kind = "source"
    source_code: ClassVar[int] = OUT_OF_NETWORK

    @abstractmethod
    def fetch(self, query: Query, state: Any) -> Candidates:
        """Implemented by every concrete component."""


class Filter(Component):
    kind = "filter"

    @abstractmethod
    def keep(self, query: Query, state: Any, cands: Candidates) -> np.ndarray:
        """Boolean mask of the candidates kept (the rest are removed)."""


class FeatureHydrator(Component):
    kind = "hydrator"

    @abstractmethod
    def hydrate(self, query: Query, state: Any, cands: Candidates) -> None:
        """Implemented by every concrete component."""


class Scorer(Component):
    kind = "scorer"
    writes: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def score(self, query: Query, state: Any, cands: Candidates) -> None:
        """Implemented by every concrete component."""


class Selector(Component):
    kind = "selector"

    @abstractmethod
    def select(self, query: Query, state: Any, cands: Candidates) -> Candidates:
        """Implemented by every concrete component."""


class SideEffect(Component):
    kind = "side_effect"

    @abstractmethod
    def run(self, query: Query, state: Any, page: Candidates) -> None:
        """Implemented by every concrete component."""
