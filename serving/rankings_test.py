"""The ranking cache: compact copies, LRU within its byte budget, latest-per-(user, feed) kept consistent."""

from __future__ import annotations

import numpy as np

from core.schema import HEAVY_NAMES
from serving.components import Candidates
from serving.rankings import Ranking, RankingCache


def _ranking(rid: str, user: int, n: int = 100) -> Ranking:
    reasons = np.empty(n, dtype=object)
    reasons[:] = [["fresh"] for _ in range(n)]
    cands = Candidates(np.arange(n), np.zeros(n, dtype=np.int8), x=np.ones((n, len(HEAVY_NAMES)), np.float32),
                       x_light=np.ones((n, 20), np.float32), score=np.ones(n, np.float32),
                       heads=np.ones((n, 6), np.float32), position=np.arange(1, n + 1),
                       reasons=reasons)
    return Ranking(rid, user, "home", cands, 0, "v1", {}, 20)


def test_cached_rankings_are_compact_and_evicted_least_recently_used_first():
    full = _ranking("a", 1)
    small = full.compact()
    assert "x" in full.cands and "x" not in small.cands and "x_light" not in small.cands
    assert full.nbytes > 100_000 and small.nbytes < 15_000, (full.nbytes, small.nbytes)
    cache = RankingCache(max_bytes=3 * small.nbytes + 100)
    for i, user in enumerate((1, 2, 3)):
        cache.put(_ranking(f"r{i}", user))
    assert len(cache) == 3 and cache.latest(1, "home").request_id == "r0"
    cache.get("r0")  # used: r1 is now the least recently used
    cache.put(_ranking("r3", 4))
    assert cache.get("r1") is None and cache.latest(2, "home") is None  # its (user, feed) entry went with it
    assert cache.get("r0") is not None and cache.bytes <= cache.max_bytes and cache.evicted == 1
    cache.forget_latest(1, ["home", "explore"])
    assert cache.latest(1, "home") is None and cache.get("r0") is not None  # its cursor pages still work
