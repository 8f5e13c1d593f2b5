from __future__ import annotations

import numpy as np
import pytest

from models.retrieval import RetrievalIndex, recall


def _data(n=20_000, d=128, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, d))
    x = centers[rng.integers(0, 64, n)] + 0.5 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(n) * 7 + 3  # ids are post ids, not positions
    days = rng.uniform(0, 14, n)
    q = centers[rng.integers(0, 64, 20)] + 0.5 * rng.normal(size=(20, d))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return ids, x.astype(np.float32), days, q.astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf", "ivf_fp16", "ivf_sq8", "flat"])
def test_search_matches_exact_score_with_recency(kind):
    ids, x, days, q = _data()
    idx = RetrievalIndex(kind=kind, nlist=256, nprobe=256, recency=0.8).build(ids, x, days)
    assert idx.index.d == idx.width == (144 if kind in ("ivf_fp16", "ivf_sq8") else 129)  # SQ: a SIMD width
    scores, got = idx.search(q, 500)
    want = idx.exact(q, 500, ids, x, days)
    assert recall(got, want) > (0.99 if kind != "ivf_sq8" else 0.9)
    # the score is u.p / T + recency * (day - day0) * ... : fresher posts win ties in content
    s_manual = x[(got[0, 0] - 3) // 7] @ q[0] / 0.05 + 0.8 * (days[(got[0, 0] - 3) // 7])
    assert scores[0, 0] == pytest.approx(s_manual, rel=1e-4 if kind != "ivf_sq8" else 1e-2)


def test_tune_nprobe_reaches_target_and_add_remove_save_load(tmp_path):
    ids, x, days, q = _data()
    idx = RetrievalIndex(nlist=256, nprobe=8, recency=0.5).build(ids, x, days)
    want = idx.exact(q, 2000, ids, x, days)
    res = idx.tune_nprobe(q, 2000, want, target=0.95)
    assert res["recall"] >= 0.95 and res["nprobe"] == idx.nprobe
    new = np.array([10**9])
    idx.add(new, q[:1], np.array([14.0]))  # a post exactly like the query, published now
    assert idx.search(q[:1], 5)[1][0, 0] == 10**9
    assert idx.remove(new) == 1 and 10**9 not in idx.search(q[:1], 50)[1][0]
    idx.save(tmp_path / "i.faiss")
    again = RetrievalIndex.load(tmp_path / "i.faiss", nprobe=idx.nprobe, recency=0.5)
    assert np.array_equal(again.search(q, 100)[1], idx.search(q, 100)[1])
    assert again.size == len(ids)
