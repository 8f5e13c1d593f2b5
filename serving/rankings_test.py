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


def test_an_encoded_ranking_decodes_to_the_same_compact_ranking():
    from serving.rankings import decode, encode

    r = _ranking("enc", 7, n=50)
    r.experiments, r.degraded, r.pos_offset, r.scored_ms = {"exp": "b"}, ["source_timeout:AnnSource"], 20, 123
    back = decode(encode(r))
    small = r.compact()
    assert (back.request_id, back.user_id, back.feed_type, back.model_version, back.experiments, back.degraded,
            back.pos_offset, back.scored_ms) == ("enc", 7, "home", "v1", {"exp": "b"}, ["source_timeout:AnnSource"], 20, 123)
    assert set(back.cands.cols) == set(small.cands.cols) and "x" not in back.cands
    np.testing.assert_array_equal(back.cands.ids, small.cands.ids)
    for name, v in small.cands.cols.items():
        if v.dtype == object:
            assert [list(x) for x in back.cands[name]] == [list(x) for x in v]
        else:
            assert back.cands[name].dtype == v.dtype
            np.testing.assert_array_equal(back.cands[name], v)
    import pytest

    with pytest.raises(ValueError):
        decode(b"not a ranking")


def test_replicas_share_rankings_latest_pointers_and_signal_times_through_redis(cfg):
    """Two processes' views (each its own local cache and connection) over one real Redis: what one stores the
    other serves; a forget or a signal on one is seen by the other; with Redis down each falls back to its own
    copies and says so."""
    from runtime import stack
    from serving.rankings import SharedRankings
    from serving.state import RedisGuard

    stack.up(cfg)
    try:
        a, b = (SharedRankings(RedisGuard(cfg.redis.uri), RankingCache(1 << 20), ttl_s=60, latest_ttl_s=30)
                for _ in range(2))
        a.put(_ranking("ra", 1))
        got, signal = b.page("ra", 1)
        assert got is not None and got.request_id == "ra" and signal == -1
        np.testing.assert_array_equal(got.cands["score"], _ranking("ra", 1).cands["score"])
        assert b.latest(1, "home").request_id == "ra" and b.local.get("ra") is None  # served from Redis
        a.signalled(1, 5_000)
        assert b.page("ra", 1)[1] == 5_000
        b.put(_ranking("rb", 1))  # a newer ranking on the other replica: a refresh on either serves it
        assert a.latest(1, "home").request_id == "rb"
        b.forget_latest(1, ["home", "explore"])
        assert a.latest(1, "home") is None and a.get("ra") is not None  # cursor pages still continue
        stack.down(cfg)
        notes: list[str] = []
        assert a.page("ra", 1, notes.append)[0].request_id == "ra" and notes == ["ranking_cache_local"]
        assert b.get("ra") is None and b.fallbacks == 1  # b never stored ra itself
    finally:
        stack.down(cfg)
