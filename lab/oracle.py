"""The oracle ceiling of a served page, from the simulator's ground truth.

For each page a variant serves, two rankings that no real system can compute, because they read
the true utilities:

* **oracle order**: the same served items, re-ordered by true utility (what a perfect ranker
  could have made of what this funnel put on the page);
* **oracle over all eligible posts**: the page's positions filled with the best posts of the whole
  corpus for this user at this moment (published by then, not the user's own, not policy-flagged,
  not already served to the user in this run): the ceiling of retrieval and ranking together.

Each is scored like the served page (examination probability of the position x true utility), so a
variant's expected utility per page reads as a share of what was achievable.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np


class OracleCeiling:
    def __init__(self, world: Any, max_position: int = 200):
        self.world = world
        self.exam = world.examination_prob(np.arange(1, max_position + 1))
        self.served: dict[int, set[int]] = defaultdict(set)

    def page(self, user: int, posts: np.ndarray, positions: np.ndarray, now_ms: int) -> dict[str, float]:
        """Expected utility of the served page, of its oracle order and of the oracle over all eligible posts."""
        w = self.world
        exam = self.exam[np.minimum(positions, self.exam.size) - 1]
        util = w.true_utility(user, posts, now_ms)
        exam_sorted = np.sort(exam)[::-1]
        seen = self.served[user]  # served before this page: this page's items stay in the oracle's pool
        n = w.n_posts
        eligible = np.flatnonzero((w.post_ts[:n] <= now_ms) & (w.post_author[:n] != user) & ~w.post_flagged[:n])
        if seen:
            eligible = eligible[~np.isin(eligible, np.fromiter(seen, dtype=np.int64, count=len(seen)))]
        eligible = np.union1d(eligible, posts)  # what was served was eligible: the oracle could pick it too
        best = np.sort(w.true_utility(user, eligible, now_ms))[::-1][: posts.size]
        seen.update(int(p) for p in posts)
        return {"expected_utility": float((util * exam).sum()),
                "oracle_order_expected_utility": float((np.sort(util)[::-1] * exam_sorted).sum()),
                "oracle_all_expected_utility": float((best * exam_sorted[: best.size]).sum())}


def shares(pages: list[dict[str, float]]) -> dict[str, float | None]:
    """Mean expected utility per page as a share of each oracle's (ratio of means over the same pages)."""
    if not pages:
        return {"share_of_oracle_order": None, "share_of_oracle_all": None}
    served = float(np.mean([p["expected_utility"] for p in pages]))
    out = {}
    for key, name in (("oracle_order_expected_utility", "share_of_oracle_order"),
                      ("oracle_all_expected_utility", "share_of_oracle_all")):
        ceiling = float(np.mean([p[key] for p in pages]))
        out[name] = round(served / ceiling, 4) if ceiling > 0 else None
        out[key.replace("_expected_utility", "_page_expected_utility")] = round(ceiling, 4)
    return out
