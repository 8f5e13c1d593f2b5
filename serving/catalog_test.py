"""Post catalog and follow graph: bootstrap snapshot plus live changes."""

from __future__ import annotations

import numpy as np

from serving.catalog import FollowGraph, PostCatalog


def test_graph_snapshot_plus_changes():
    g = FollowGraph()
    g.load(np.array([1, 1, 2, 3]), np.array([5, 6, 5, 5]))
    assert g.following(1) == [5, 6] and g.followers(5) == [1, 2, 3] and g.follower_count(5) == 3
    assert g.apply(1, 7, True) and not g.apply(1, 7, True)
    assert g.apply(2, 5, False) and not g.follows(2, 5)
    assert g.following(1) == [5, 6, 7] and g.followers(5) == [1, 3]
    assert g.follower_counts(np.array([5, 6, 7, 99])).tolist() == [2, 1, 1, 0]
    assert g.apply(2, 5, True) and g.follows(2, 5) and g.follower_count(5) == 3
    assert g.following(42) == [] and not g.follows(42, 5)


def test_catalog_add_grow_and_recent_by_author():
    c = PostCatalog(capacity=4)
    c.load(np.array([0, 1, 2]), np.array([9, 9, 8]), np.array([1, 2, 3]), np.array([0, 1, 2]),
           np.array([True, True, False]), np.array([False, False, True]), np.array([100, 200, 150]))
    assert c.add(10, 9, 4, 1, True, False, 300) and not c.add(10, 9, 4, 1, True, False, 300)  # replay: no-op
    assert c.n == 11 and c.known(np.array([0, 5, 10, 99])).tolist() == [True, False, True, False]
    assert c.recent_by_authors([9], since_ms=150, now_ms=250).tolist() == [1]
    assert c.recent_by_authors([9, 8], since_ms=0, now_ms=1000).tolist() == [10, 1, 0, 2]
