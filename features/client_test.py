"""Feature clients against a real Redis: Feast-layout writer and reader agree with Feast itself."""

from __future__ import annotations

import numpy as np
import pytest

from features.client import FeatureWriter, OnlineStoreReader, redis_client
from features.feast_repo import apply
from infra import runtime


@pytest.mark.slow
def test_reader_and_writer_match_get_online_features(cfg):
    runtime.up(cfg)
    try:
        store = apply(cfg)
        w = FeatureWriter(cfg)
        users = np.array([3, 11, 2**40 + 5], dtype=np.int64)
        tc = [np.eye(24, dtype=np.float32)[i % 24].tolist() for i in range(3)]
        w.write("user_topic", users, {"topic_clicks": tc, "topic_negative": tc, "ctype_clicks": [[1.0, 0, 0]] * 3,
                                      "clicks": np.array([5, 0, 7]), "negatives": np.array([1, 0, 2]),
                                      "clicks_1h": np.array([0, 0, 1]), "last_engagement_ms": np.array([9, 8, 7])})
        w.write("user_embedding", users[:1], {"embedding": [[0.5] * 128]})
        reader = OnlineStoreReader(cfg, store)
        mine = reader.read(redis_client(cfg), "user_topic", users.tolist() + [99])
        feast = store.get_online_features(["user_topic:clicks", "user_topic:topic_clicks", "user_topic:negatives"],
                                          entity_rows=[{"user_id": int(u)} for u in users]).to_dict()
        assert [m["clicks"] for m in mine[:3]] == feast["clicks"] == [5, 0, 7]
        assert [m["negatives"] for m in mine[:3]] == feast["negatives"]
        assert [m["topic_clicks"] for m in mine[:3]] == feast["topic_clicks"]
        assert mine[3] is None  # no row
        emb = reader.read(redis_client(cfg), "user_embedding", [3, 11])
        assert emb[0]["embedding"] == [0.5] * 128 and emb[1] is None
    finally:
        runtime.down(cfg)
