"""Served feature snapshots: the exact vectors the heavy ranker scored, kept for training.

Serving writes one snapshot per ranked page (post ids + their heavy-feature rows) and puts
its id on every Exposure; the online learner joins exposures with later engagements and
reads the rows back, so it learns from what was served, not from features recomputed
later (which would leak the future). Rows are stored as float16 (half the Redis memory;
relative error ~1e-3, far below the features' noise) and expire after
``serving.snapshot_ttl_s``, which must exceed the learner's attribution window.
"""

from __future__ import annotations

import numpy as np

from core.config import Config

KEY = "feedrank:snap:{}"


class SnapshotStore:
    def __init__(self, cfg: Config):
        from features.connection import redis_client

        self.redis = redis_client(cfg)
        self.ttl = int(cfg.serving.snapshot_ttl_s)

    def put(self, snapshot_id: str, post_ids: np.ndarray, x: np.ndarray, pipe=None) -> None:
        post_ids = np.asarray(post_ids, dtype=np.int64)
        x = np.asarray(x, dtype=np.float16)
        if x.ndim != 2 or x.shape[0] != post_ids.size:
            raise ValueError(f"snapshot {snapshot_id}: {post_ids.size} post ids but features of shape {x.shape}")
        r = pipe if pipe is not None else self.redis
        r.hset(KEY.format(snapshot_id), mapping={"ids": post_ids.tobytes(), "x": x.tobytes(), "f": x.shape[1]})
        r.expire(KEY.format(snapshot_id), self.ttl)

    def get_many(self, snapshot_ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{id: (post ids, float32 rows)} for the snapshots that still exist."""
        with self.redis.pipeline(transaction=False) as pipe:
            for sid in snapshot_ids:
                pipe.hgetall(KEY.format(sid))
            raw = pipe.execute()
        out = {}
        for sid, h in zip(snapshot_ids, raw):
            if h:
                ids = np.frombuffer(h[b"ids"], dtype=np.int64)
                out[sid] = (ids, np.frombuffer(h[b"x"], dtype=np.float16).reshape(ids.size, int(h[b"f"])).astype(np.float32))
        return out
