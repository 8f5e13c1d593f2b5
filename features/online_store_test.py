"""Feature clients against a real Redis: Feast-layout writer and reader agree with Feast itself."""

from __future__ import annotations

import numpy as np
import pytest

from features.connection import redis_client

from features.online_store import OnlineStoreReader

from features.writer import FeatureWriter
from features.feast_repo import apply
from runtime import stack


@pytest.mark.slow
def test_reader_and_writer_match_get_online_features(cfg):
    stack.up(cfg)
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
        stack.down(cfg)


def test_hand_encoded_values_are_byte_identical_to_protobuf():
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    from features.online_store import encode_values

    ints = [0, 1, 127, 128, 300, 2**40 + 5, 2**63 - 1, -1, -(2**63)]
    assert encode_values("i", np.array(ints)) == [Value(int64_val=v).SerializeToString() for v in ints]
    floats = [0.0, -0.0, 1.5, 1e-40, 3.4e38, 0.1, float("inf")]
    assert encode_values("f", floats) == [Value(float_val=v).SerializeToString() for v in floats]
    assert encode_values("b", [True, False]) == [Value(bool_val=v).SerializeToString() for v in (True, False)]
    rows = np.random.default_rng(0).normal(size=(4, 128)).astype(np.float32)
    for m in (rows, rows[:, :3], rows[:, :32], np.zeros((2, 0), np.float32)):
        assert encode_values("fl", m) == [Value(float_list_val=FloatList(val=r.tolist())).SerializeToString() for r in m]
    ragged = [[1.0, 2.0], [0.5], []]
    assert encode_values("fl", ragged) == [Value(float_list_val=FloatList(val=r)).SerializeToString() for r in ragged]
