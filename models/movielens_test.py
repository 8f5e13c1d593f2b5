"""MovieLens-100K from the recbole wheel (downloaded by pip into the cache, never committed)."""

from __future__ import annotations

import numpy as np
import pytest

from models.movielens import ML100K, full_ranking_metrics


def test_full_ranking_metrics_excludes_seen_items():
    scores = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3]])
    m = full_ranking_metrics(scores, [np.array([0]), np.array([], dtype=int)], np.array([1, 0]), k=1)
    # user 0: item 0 is seen, so item 1 ranks first (hit); user 1: item 0 ranks last (miss)
    assert m["recall@10"] == 0.5


@pytest.mark.slow
def test_loads_ml100k_with_leave_last_out_split(cfg):
    d = ML100K.load(cfg.data_dir / "cache")
    assert (d.n_users, d.n_items) == (943, 1682)
    assert len(d.train) + len(d.valid) + len(d.test) == 100_000
    assert len(d.test) == len(d.valid) == 943
    last_train = d.train.groupby("user").ts.max()
    assert (d.test.set_index("user").ts >= last_train.reindex(d.test.user).values).all()  # test is latest in time
    assert len(d.genre_names) >= 18 and d.titles[0] == "Toy Story"
