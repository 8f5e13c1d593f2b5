"""The ranking cache behind cursor pages and refreshes: compact rankings, LRU within a byte budget.

A ranked list of ~120 items with its feature matrices is ~190 KB (338 heavy features per row);
kept per request that made gigabytes per worker under ordinary traffic. The cache keeps what a
later page or refresh needs to *serve* (ids, sources, positions, scores, head scores, reasons
and the small inputs of re-hydration such as the ANN cosine), ~19 KB, and drops the feature
matrices: a cursor page re-hydrates the rows it serves (so its exposure snapshot holds the
features as served), a refresh re-hydrates and re-scores its top positions anyway.

Replicas share them: :class:`SharedRankings` keeps every compact ranking in Redis (its own
binary encoding, no pickle: :func:`encode`), so a cursor page or a refresh that lands on another
worker or replica serves the ranking it continues, and the time of each user's latest signal, so
any replica re-scores a cursor page after a like. This process's :class:`RankingCache` is what it
falls back on while Redis is unavailable (the response then says ``ranking_cache_local``).
"""

from __future__ import annotations

import json
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

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


# ---------------------------------------------------------------------------- shared by replicas

RANKING_KEY = "feedrank:ranking:{}"            # request id -> encoded compact ranking
LATEST_KEY = "feedrank:ranking:latest:{}:{}"   # (user, feed type) -> request id of the ranking a refresh serves
SIGNALLED_KEY = "feedrank:signalled:{}"        # user -> serving time (ms) of their latest signal or feedback
_MAGIC = b"FRR1"
_META = ("request_id", "user_id", "feed_type", "created_ms", "model_version", "experiments", "limit", "degraded",
         "pos_offset", "scored_ms")


def encode(r: Ranking) -> bytes:
    """A compact ranking as bytes: a JSON header (its fields, each column's dtype and shape; object
    columns such as reasons as JSON values) and the numeric columns' raw bytes."""
    c = r.compact().cands
    cols: list[list[Any]] = []
    blobs: list[bytes] = []
    for name, v in (("ids", c.ids), ("source", c.source), *c.cols.items()):
        if v.dtype == object:
            cols.append([name, "json", [list(x) if isinstance(x, (list, tuple)) else x for x in v.tolist()]])
        else:
            a = np.ascontiguousarray(v)
            cols.append([name, a.dtype.str, list(a.shape)])
            blobs.append(a.tobytes())
    head = json.dumps({"meta": {k: getattr(r, k) for k in _META}, "cols": cols}, separators=(",", ":")).encode()
    return b"".join([_MAGIC, struct.pack("<I", len(head)), head, *blobs])


def decode(blob: bytes) -> Ranking:
    """:func:`encode`'s inverse; ValueError for bytes it did not write."""
    if blob[:4] != _MAGIC:
        raise ValueError("not an encoded ranking")
    (n,) = struct.unpack_from("<I", blob, 4)
    head = json.loads(blob[8: 8 + n])
    at, arrays = 8 + n, {}
    for name, dtype, shape in head["cols"]:
        if dtype == "json":
            a = np.empty(len(shape), dtype=object)
            a[:] = shape
        else:
            dt = np.dtype(dtype)
            size = int(np.prod(shape)) * dt.itemsize
            a = np.frombuffer(blob, dtype=dt, count=int(np.prod(shape)), offset=at).reshape(shape).copy()
            at += size
        arrays[name] = a
    ids, source = arrays.pop("ids"), arrays.pop("source")
    m = head["meta"]
    return Ranking(m["request_id"], m["user_id"], m["feed_type"], Candidates(ids, source, **arrays), m["created_ms"],
                   m["model_version"], m["experiments"], m["limit"], m["degraded"], m["pos_offset"], m["scored_ms"])


class SharedRankings:
    """Rankings and users' latest signal times in Redis, for every worker and replica.

    A ranking lives ``ttl_s`` (cursor pages older than that rank again; the seen filter skips what was
    served), the (user, feed) pointer a refresh follows ``latest_ttl_s``. Every read goes to Redis, so a
    ranking re-scored on one replica (a cursor page after a like) is what the next page reads on any
    other. Redis keys expire (the store's ``volatile-lru`` evicts them first at maxmemory). While Redis is
    unavailable, this process's own cache serves and ``degrade("ranking_cache_local")`` says so."""

    def __init__(self, guard: Any, local: RankingCache, ttl_s: float, latest_ttl_s: float):
        from serving.state import RedisUnavailable

        self.guard, self.local = guard, local
        self.ttl_ms, self.latest_ttl_ms = max(int(ttl_s * 1000), 1), max(int(latest_ttl_s * 1000), 1)
        self.unavailable = RedisUnavailable
        self.fallbacks = 0
        self._signals: OrderedDict[int, int] = OrderedDict()  # the local fallback of SIGNALLED_KEY

    def _redis(self, fn: Callable[[Any], Any], degrade: Callable[[str], None] | None) -> tuple[bool, Any]:
        try:
            return True, self.guard.run(fn)
        except self.unavailable:
            self.fallbacks += 1
            if degrade is not None:
                degrade("ranking_cache_local")
            return False, None

    def put(self, r: Ranking, latest: bool = True, degrade: Callable[[str], None] | None = None) -> Ranking:
        c = self.local.put(r, latest)
        blob = encode(c)

        def write(rc: Any) -> None:
            with rc.pipeline(transaction=False) as p:
                p.set(RANKING_KEY.format(c.request_id), blob, px=self.ttl_ms)
                if latest:
                    p.set(LATEST_KEY.format(c.user_id, c.feed_type), c.request_id, px=self.latest_ttl_ms)
                p.execute()
        self._redis(write, degrade)
        return c

    def page(self, request_id: str, user_id: int,
             degrade: Callable[[str], None] | None = None) -> tuple[Ranking | None, int]:
        """The ranking a cursor continues, and the time of the user's latest signal (-1: none), in one round trip."""
        def read(rc: Any) -> list[Any]:
            with rc.pipeline(transaction=False) as p:
                p.get(RANKING_KEY.format(request_id))
                p.get(SIGNALLED_KEY.format(user_id))
                return p.execute()
        ok, got = self._redis(read, degrade)
        if not ok:
            return self.local.get(request_id), self._signals.get(user_id, -1)
        blob, sig = got
        return (decode(blob) if blob else None), (int(sig) if sig else -1)

    def get(self, request_id: str, degrade: Callable[[str], None] | None = None) -> Ranking | None:
        return self.page(request_id, -1, degrade)[0]

    def __getitem__(self, request_id: str) -> Ranking:
        r = self.get(request_id)
        if r is None:
            raise KeyError(request_id)
        return r

    def latest(self, user_id: int, feed_type: str, degrade: Callable[[str], None] | None = None) -> Ranking | None:
        """The ranking a refresh of this user's feed serves (the latest, whichever replica ranked it)."""
        key = LATEST_KEY.format(user_id, feed_type)

        def read(rc: Any) -> Any:
            rid = rc.get(key)
            return None if rid is None else rc.get(RANKING_KEY.format(rid.decode()))
        ok, blob = self._redis(read, degrade)
        if not ok:
            return self.local.latest(user_id, feed_type)
        return decode(blob) if blob else None

    def forget_latest(self, user_id: int, feed_types: list[str]) -> None:
        """No refresh on any replica serves these rankings again (a hide, a follow)."""
        self.local.forget_latest(user_id, feed_types)
        self._redis(lambda rc: rc.delete(*[LATEST_KEY.format(user_id, f) for f in feed_types]), None)

    def signalled(self, user_id: int, now_ms: int) -> None:
        """The user sent a signal or feedback at ``now_ms``: the next cursor page on any replica re-scores."""
        self._signals[user_id] = now_ms
        self._signals.move_to_end(user_id)
        while len(self._signals) > 200_000:
            self._signals.popitem(last=False)
        self._redis(lambda rc: rc.set(SIGNALLED_KEY.format(user_id), now_ms, px=self.ttl_ms), None)
