"""The ranking cache behind cursor pages and refreshes: compact rankings, LRU within a byte budget.

A ranked list of ~120 items with its feature matrices is ~190 KB (338 heavy features per row);
kept per request that made gigabytes per worker under ordinary traffic. The cache keeps what a
later page or refresh needs to *serve* (ids, sources, positions, scores, head scores, reasons
and the small inputs of re-hydration such as the ANN cosine), ~19 KB, and drops the feature
matrices: a cursor page re-hydrates the rows it serves (so its exposure snapshot holds the
features as served), a refresh re-hydrates and re-scores its top positions anyway.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from serving.components import Candidates

DROPPED = ("x", "x_light")  # the feature matrices, re-hydrated for the rows served
OBJECT_ROW_BYTES = 96  # estimate per row of an object column (a short list of reason strings)


@dataclass
class Ranking:
    request_id: str
    user_id: int
    feed_type: str
    cands: Candidates
    created_ms: int
    model_version: str
    experiments: dict[str, str]
    limit: int
    degraded: list[str] = field(default_factory=list)
    pos_offset: int = 0
    scored_ms: int = 0  # when its order was last computed (ranked, or re-scored after a signal)

    def compact(self) -> "Ranking":
        """The same ranking without its feature matrices (the arrays are shared, not copied)."""
        c = self.cands
        kept = Candidates(c.ids, c.source, **{k: v for k, v in c.cols.items() if k not in DROPPED})
        return Ranking(self.request_id, self.user_id, self.feed_type, kept, self.created_ms, self.model_version,
                       dict(self.experiments), self.limit, list(self.degraded), self.pos_offset, self.scored_ms)

    @property
    def nbytes(self) -> int:
        c = self.cands
        n = c.ids.nbytes + c.source.nbytes + 256  # + the object and its small fields
        for v in c.cols.values():
            n += len(v) * OBJECT_ROW_BYTES if v.dtype == object else v.nbytes
        return n


class RankingCache:
    """Rankings by request id (cursor pages) and the latest per (user, feed type) (refreshes).

    One LRU over both, bounded in bytes: the least recently used ranking goes first, and with it
    the (user, feed) entry that pointed to it. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evicted = 0
        self._by_id: OrderedDict[str, Ranking] = OrderedDict()
        self._latest: dict[tuple[int, str], str] = {}
        self._lock = threading.Lock()

    def put(self, r: Ranking, latest: bool = True) -> Ranking:
        """Store the compact copy of ``r`` (and make it the latest for its user and feed); returns it."""
        c = r.compact()
        size = c.nbytes
        with self._lock:
            old = self._by_id.pop(c.request_id, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._by_id[c.request_id] = c
            self.bytes += size
            if latest:
                self._latest[(c.user_id, c.feed_type)] = c.request_id
            while self.bytes > self.max_bytes and len(self._by_id) > 1:
                rid, gone = self._by_id.popitem(last=False)
                self.bytes -= gone.nbytes
                self.evicted += 1
                if self._latest.get((gone.user_id, gone.feed_type)) == rid:
                    del self._latest[(gone.user_id, gone.feed_type)]
        return c

    def get(self, request_id: str) -> Ranking | None:
        with self._lock:
            r = self._by_id.get(request_id)
            if r is not None:
                self._by_id.move_to_end(request_id)
            return r

    def __getitem__(self, request_id: str) -> Ranking:
        r = self.get(request_id)
        if r is None:
            raise KeyError(request_id)
        return r

    def latest(self, user_id: int, feed_type: str) -> Ranking | None:
        with self._lock:
            rid = self._latest.get((user_id, feed_type))
            return self._by_id.get(rid) if rid is not None else None

    def forget_latest(self, user_id: int, feed_types: list[str]) -> None:
        """No refresh serves these rankings again (the user hid something, followed someone); their
        cursor pages still serve the rest of the list they began."""
        with self._lock:
            for f in feed_types:
                self._latest.pop((user_id, f), None)

    def __len__(self) -> int:
        return len(self._by_id)
