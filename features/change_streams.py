"""Change streams in Redis that serving replicas follow instead of reading Feast per candidate.

Feast reads cost 60-300 ms per 500 entities, so the feature job also appends each pushed batch of
post stats, with its values, to :data:`POST_STATS_CHANGES`, and :class:`PostStatsCache` keeps every
post's stats in numpy arrays (bootstrapped from Feast, then following the stream). New posts work
the same way: :data:`INDEX_DELTA` carries the post tower embeddings of freshly published posts to
every replica's FAISS index (:class:`IndexDeltaFollower`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from core.config import Config
from core.schema import POST_STATS_FLOAT, POST_STATS_INT
from core.units import DAY_MS
from features.connection import redis_client

POST_STATS_CHANGES = "feedrank:changes:post_stats"
INDEX_DELTA = "feedrank:index_delta"


class StreamFollower:
    """Polls a Redis stream in a daemon thread (blocking reads: a change lands within milliseconds).
    Subclasses implement ``poll(block_ms)`` and set ``self._stop`` / ``self._thread`` in ``__init__``."""

    name = "stream-follower"
    healthy = True

    def poll(self, block_ms: int | None = None) -> int:
        raise RuntimeError(f"{type(self).__name__} must define poll()")

    def start(self) -> "StreamFollower":
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.poll(block_ms=200)
                    self.healthy = True
                except Exception as e:  # noqa: BLE001 - Redis outages must not kill serving; retry
                    if self.healthy:
                        logging.getLogger("feedrank.features").warning("%s: stream unavailable (%s); retrying",
                                                                       self.name, e)
                    self.healthy = False
                    time.sleep(0.5)

        self._thread = threading.Thread(target=loop, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)


class PostStatsCache(StreamFollower):
    """Every post's stats in numpy, following the change stream (serving's in-process copy).

    ``ints[post]`` / ``floats[post]`` are in POST_STATS_INT / POST_STATS_FLOAT order;
    ``applied_ms[post]`` is when the job pushed the values this replica holds.
    """

    name = "post-stats-cache"

    def __init__(self, cfg: Config, capacity: int = 1 << 16):
        self.redis = redis_client(cfg)
        self.ints = np.zeros((capacity, len(POST_STATS_INT)), dtype=np.int64)
        self.floats = np.zeros((capacity, len(POST_STATS_FLOAT)), dtype=np.float32)
        self.pushed_ms = np.zeros(capacity, dtype=np.int64)
        self.last_id = "0-0"
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _grow(self, n: int) -> None:
        cap = self.ints.shape[0]
        if n <= cap:
            return
        new = max(n, cap * 2)
        self.ints = np.vstack([self.ints, np.zeros((new - cap, self.ints.shape[1]), dtype=np.int64)])
        self.floats = np.vstack([self.floats, np.zeros((new - cap, self.floats.shape[1]), dtype=np.float32)])
        self.pushed_ms = np.concatenate([self.pushed_ms, np.zeros(new - cap, dtype=np.int64)])

    def apply(self, fields: dict[bytes, bytes]) -> int:
        ids = np.frombuffer(fields[b"ids"], dtype=np.int64)
        ints = np.frombuffer(fields[b"ints"], dtype=np.int64).reshape(ids.size, -1)
        floats = np.frombuffer(fields[b"floats"], dtype=np.float32).reshape(ids.size, -1)
        with self.lock:
            self._grow(int(ids.max()) + 1 if ids.size else 0)
            self.ints[ids] = ints
            self.floats[ids] = floats
            self.pushed_ms[ids] = int(fields[b"pushed_ms"])
        return int(ids.size)

    def poll(self, block_ms: int | None = None) -> int:
        """Apply every change after the last one seen; returns rows applied."""
        got = self.redis.xread({POST_STATS_CHANGES: self.last_id}, count=1000, block=block_ms)
        n = 0
        for _, entries in got or []:
            for entry_id, fields in entries:
                n += self.apply(fields)
                self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        return n

    def get(self, post_id: int) -> dict[str, float]:
        with self.lock:
            if post_id >= self.ints.shape[0]:
                return {}
            return {**dict(zip(POST_STATS_INT, self.ints[post_id].tolist())),
                    **dict(zip(POST_STATS_FLOAT, self.floats[post_id].tolist()))}


class IndexDeltaFollower:
    """Applies the new-post index delta to a serving replica's FAISS index.

    Entries embedded for another retrieval version are skipped (their vectors live in a
    different space); re-applied entries (a job restart replays its last batch) replace
    the old vector instead of duplicating it.
    """

    def __init__(self, cfg: Config, index: Any, version: str, start_id: str = "0-0"):
        self.redis = redis_client(cfg)
        self.index, self.version, self.last_id = index, version, start_id
        self.applied = 0
        self.skipped = 0

    def poll(self, block_ms: int | None = None) -> int:
        got = self.redis.xread({INDEX_DELTA: self.last_id}, count=100, block=block_ms)
        n = 0
        for _, entries in got or []:
            for entry_id, f in entries:
                self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                if f[b"version"].decode() != self.version:
                    self.skipped += 1
                    continue
                ids = np.frombuffer(f[b"ids"], dtype=np.int64)
                emb = np.frombuffer(f[b"emb"], dtype=np.float32).reshape(ids.size, -1)
                day = np.frombuffer(f[b"published_ms"], dtype=np.int64) / DAY_MS
                self.index.remove(ids)
                self.index.add(ids, emb, day)
                n += ids.size
        self.applied += n
        return n
