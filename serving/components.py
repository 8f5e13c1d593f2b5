"""The funnel's vocabulary, product-mixer style: a :class:`Query`, columnar
:class:`Candidates`, the :class:`FunnelContext` components may use, and the seven kinds of
component a pipeline is assembled from.

* ``QueryHydrator`` — reads what the request needs about the user (once per request);
* ``CandidateSource`` — fetches candidate ids (run in parallel, each with a timeout and a
  declared failure policy: fail open = leave it out and flag the response degraded);
* ``Filter`` — returns which candidates are kept (and so which are removed, for debugging);
* ``FeatureHydrator`` — attaches feature columns;
* ``Scorer`` — writes score columns;
* ``Selector`` — reorders / truncates (top-k, re-rank rules);
* ``SideEffect`` — runs on the page served: synchronously before the response (the seen set)
  or asynchronously after it on the side-effect worker (exposure logging).

Every component declares the candidate columns it ``reads`` and ``writes``; a pipeline
checks at construction that each read is written upstream.

Candidates are columns of numpy arrays, not objects: 10K candidates per request pass
through every stage, and per-object Python would cost more than the whole budget.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import numpy as np

from core.events import ContentType, Source
from serving.protos import pb

if TYPE_CHECKING:
    from core.config import Config
    from features.change_streams import PostStatsCache
    from features.eventlog import EventLog
    from features.snapshots import SnapshotStore
    from serving.catalog import FollowGraph, PostCatalog
    from serving.model_loader import ModelLoader, Models
    from serving.served import ServedRecords
    from serving.state import RedisGuard

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
    unfollowed_authors: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # sorted, recent
    fatigue_authors: dict[int, float] = field(default_factory=dict)  # decayed suppression weight in [0, 1]
    fatigue_topics: dict[int, float] = field(default_factory=dict)
    affinity: dict[int, int] = field(default_factory=dict)           # author -> past engagements
    viewed_posts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # the session's, newest last
    liked_posts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))   # newest last
    session_start_ms: int = 0
    last_view_ms: int = 0
    session_depth: int = 0
    cached_candidates: np.ndarray | None = None                      # fan-out cache (None = miss)


@dataclass
class Query:
    request_id: str
    user_id: int
    feed_type: str                      # home | explore | following
    now_ms: int
    limit: int
    params: Any                         # serving.ab_tests.Params: effective settings after experiments
    experiments: dict[str, str]
    deadline: float                     # time.monotonic() by which the answer must be sent
    user: UserContext | None = None
    degraded: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    source_counts: dict[str, int] = field(default_factory=dict)
    debug_post: int | None = None
    debug_source: int = pb.OUT_OF_NETWORK  # DebugRanking: the source the traced ranking gave debug_post
    cached: Candidates | None = None       # a refresh: the ranking it re-ranks
    trace: list[dict[str, Any]] = field(default_factory=list)  # DebugRanking: what happened to debug_post
    model_version: str = ""
    executed: list[str] = field(default_factory=list)           # "<kind> <name>" of each component run, in order
    funnel: list[tuple[str, int, int]] = field(default_factory=list)  # (stage, candidates in, out), in run order
    pipeline: str = ""                                          # the pipeline that ranked it ("" = a cursor page)

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


class FunnelContext(Protocol):
    """What funnel components may use of the serving process (:class:`serving.state.ServingState`
    implements it): in-memory post data, the follow graph, the models, and the few Redis-backed
    operations sources and side effects need."""

    cfg: "Config"
    catalog: "PostCatalog"
    graph: "FollowGraph"
    stats: "PostStatsCache"
    author_ctr: np.ndarray
    topic_trend: np.ndarray
    trending: np.ndarray
    ads: dict[int, float]
    models: "Models"
    loader: "ModelLoader"
    redis: "RedisGuard"
    snapshots: "SnapshotStore"
    served: "ServedRecords"
    events: "EventLog"

    def user_context(self, user_id: int, degrade: Callable[[str], None], need_cache: bool = True) -> UserContext: ...

    def celebrity(self, author: int) -> bool: ...

    def rebuild_cache(self, user: UserContext, now_ms: int) -> np.ndarray: ...

    def record_seen(self, user: int, post_ids: list[int], now_ms: int) -> None: ...


def member(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``x in sorted_values`` elementwise, by binary search (the user's sorted id sets)."""
    if sorted_values.size == 0:
        return np.zeros(np.shape(x), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_values, x), sorted_values.size - 1)
    return sorted_values[i] == x


class Component(ABC):
    """Base of every funnel component: a name for metrics, traces and DebugRanking, and the
    candidate columns it reads (must be written upstream) and writes."""

    kind: ClassVar[str] = "component"
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    #: A cheaper stand-in run instead when the request has no time left for this stage, or an input column
    #: is missing because an earlier stage fell back (:mod:`serving.deadlines`); None: always runs.
    deadline_fallback: "Component | None" = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def params(self) -> str:
        """The constructor arguments that change its behaviour (shown by ``describe``)."""
        return ""

    def describe(self) -> str:
        """The component as `feedrank serve --describe` prints it."""
        params = f" [{self.params()}]" if self.params() else ""
        cols = (f"  reads {', '.join(self.reads)}" if self.reads else "") + \
               (f"  writes {', '.join(self.writes)}" if self.writes else "")
        late = f"  (out of time: {self.deadline_fallback.name})" if self.deadline_fallback is not None else ""
        return f"{self.kind:<14} {self.name}{params}{cols}{late}"


class QueryHydrator(Component):
    kind = "query_hydrator"

    @abstractmethod
    def hydrate(self, query: Query, ctx: FunnelContext) -> None:
        """Sets what the query needs (e.g. ``query.user``)."""


class CandidateSource(Component):
    """A source of candidate ids. ``fail_open`` (the default): a late or failing source is left out
    and the response flagged degraded; otherwise the request fails UNAVAILABLE."""

    kind = "source"
    source_code: ClassVar[int] = OUT_OF_NETWORK

    def __init__(self, fail_open: bool = True):
        self.fail_open = fail_open

    def params(self) -> str:
        return f"fail_open={self.fail_open}"

    @abstractmethod
    def fetch(self, query: Query, ctx: FunnelContext) -> Candidates:
        """The candidates, with a source code each and the columns in ``writes``."""


class Filter(Component):
    kind = "filter"

    @abstractmethod
    def keep(self, query: Query, ctx: FunnelContext, cands: Candidates) -> np.ndarray:
        """Boolean mask of the candidates kept (the rest are removed)."""


class FeatureHydrator(Component):
    kind = "hydrator"

    @abstractmethod
    def hydrate(self, query: Query, ctx: FunnelContext, cands: Candidates) -> None:
        """Writes the feature columns in ``writes``."""


class Scorer(Component):
    kind = "scorer"

    @abstractmethod
    def score(self, query: Query, ctx: FunnelContext, cands: Candidates) -> None:
        """Writes the score columns in ``writes``."""


class Selector(Component):
    kind = "selector"

    @abstractmethod
    def select(self, query: Query, ctx: FunnelContext, cands: Candidates) -> Candidates:
        """The candidates kept, in their new order."""


class SideEffect(Component):
    """Runs on the page served. Synchronous ones run before the response (a failure degrades it);
    asynchronous ones run on the side-effect worker after it: ``prepare`` builds the payload once,
    ``apply`` writes it and is retried with the same payload on the errors in ``retry_on``."""

    kind = "side_effect"
    asynchronous: ClassVar[bool] = False
    retry_on: ClassVar[tuple[type[Exception], ...]] = ()
    unit: ClassVar[str] = "items"   # what apply's count counts (metrics)

    def describe(self) -> str:
        return super().describe() + ("  (async, after the response)" if self.asynchronous else "  (before the response)")

    def prepare(self, query: Query, ctx: FunnelContext, page: Candidates) -> Any:
        """The payload ``apply`` writes (by default the query and page themselves)."""
        return query, page

    @abstractmethod
    def apply(self, ctx: FunnelContext, payload: Any) -> int:
        """Writes the payload; returns how many ``unit`` it wrote."""
