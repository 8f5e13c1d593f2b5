"""Selectors: top-k cuts and the rule-based re-ranker that lays out the final ranking.

:class:`RerankSelector` fills slots in order. For each slot it picks the best remaining
candidate by score that satisfies, in priority order:

1. ad slots — every ``ad_every``-th position holds the best ad by bid x pCTR (when any);
2. out-of-network quota — within each page of ``limit`` items, ``ceil(min_out_of_network x limit)``
   organic slots, spread evenly across the page (interleaved, not clustered), take the
   best out-of-network candidate;
3. freshness quota — likewise ``ceil(fresh_fraction x limit)`` slots take a post from the
   last ``fresh_hours`` (when one is left);
4. author diversity — never a ``max_consecutive_author + 1``-th consecutive item by one
   author (relaxed only when no other candidate is left).

Quota slots count what is already on the page, so a fresh out-of-network post fills both.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from serving.components import AD, IN_NETWORK, Candidates, Query, Selector

HOUR_MS = 3_600_000


class TopKSelector(Selector):
    """Keeps the ``k`` best by one score column (ads always pass: they are ranked separately)."""

    def __init__(self, column: str, k_setting: str):
        self.column, self.k_setting = column, k_setting

    @property
    def name(self) -> str:
        return f"TopKSelector({self.column})"

    def select(self, query: Query, state: Any, cands: Candidates) -> Candidates:
        k = getattr(state.cfg.funnel, self.k_setting)
        ad = cands.source == AD
        organic = np.flatnonzero(~ad)
        s = cands[self.column][organic]
        if organic.size > k:
            top = np.argpartition(-s, k - 1)[:k]
            organic = organic[top]
            s = s[top]
        organic = organic[np.argsort(-s, kind="stable")]
        return cands.take(np.concatenate([organic, np.flatnonzero(ad)]))


def object_column(values: list) -> np.ndarray:
    """A 1-D object array (numpy would turn equal-length lists into a 2-D array)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _due(quota: int, n_slots: int, j: int) -> int:
    """How many quota items must be placed by organic slot ``j`` (0-based) of ``n_slots``: evenly spread."""
    return (quota * (j + 1)) // n_slots if n_slots else 0


class RerankSelector(Selector):
    """The whole ranking (every candidate that survived the heavy ranker), laid out slot by slot."""

    def select(self, query: Query, state: Any, cands: Candidates) -> Candidates:
        if query.feed_type == "following":  # reverse-chronological: no rules, no ML
            out = cands.take(np.argsort(-cands["score"], kind="stable"))
            out["reasons"] = object_column([["chronological"] for _ in range(len(out))])
            out["position"] = np.arange(1, len(out) + 1, dtype=np.int64)
            return out
        rr = query.params.rerank
        limit = max(query.limit, 1)
        cat = state.catalog
        n = len(cands)
        score = cands["score"]
        is_ad = cands.source == AD
        organic = [int(i) for i in np.argsort(-np.where(is_ad, -np.inf, score), kind="stable") if not is_ad[i]]
        ads = [int(i) for i in np.argsort(-np.where(is_ad, score, -np.inf), kind="stable") if is_ad[i]]
        oon = ~is_ad & (cands.source != IN_NETWORK)
        fresh = (query.now_ms - cat.published_ms[cands.ids]) <= rr.fresh_hours * HOUR_MS
        author = cat.author[cands.ids]
        ad_every = rr.ad_every if query.feed_type == "home" else 0
        q_oon = math.ceil(rr.min_out_of_network * limit) if query.feed_type == "home" else 0
        q_fresh = math.ceil(rr.fresh_fraction * limit)
        order: list[int] = []
        reasons: list[list[str]] = []
        used = np.zeros(n, dtype=bool)
        page_oon = page_fresh = page_org = 0
        while True:
            slot = len(order) + 1  # 1-based position in the whole ranking
            page_pos = (slot - 1) % limit
            if page_pos == 0:
                page_oon = page_fresh = page_org = 0
            if ad_every and slot % ad_every == 0:
                while ads and used[ads[0]]:
                    ads.pop(0)
                if ads:
                    i = ads.pop(0)
                    used[i] = True
                    order.append(i)
                    reasons.append(["sponsored", "ad_slot"])
                    continue
            remaining = [i for i in organic if not used[i]]
            if not remaining:
                break
            n_org = limit - (limit // ad_every if ad_every else 0)
            why: list[str] = []
            want = None
            if page_oon < _due(q_oon, n_org, page_org) and any(oon[i] for i in remaining):
                want, tag = oon, "out_of_network_quota"
                if page_fresh < _due(q_fresh, n_org, page_org) and any(oon[i] and fresh[i] for i in remaining):
                    want, tag = oon & fresh, "out_of_network_quota"
                why.append(tag)
            elif page_fresh < _due(q_fresh, n_org, page_org) and any(fresh[i] for i in remaining):
                want = fresh
                why.append("freshness_quota")
            pool = [i for i in remaining if want is None or want[i]]
            recent = order[-rr.max_consecutive_author:]
            pick = None
            for i in pool:
                if len(recent) == rr.max_consecutive_author and all(author[j] == author[i] for j in recent):
                    continue  # would be one too many in a row by this author
                pick = i
                break
            if pick is None:
                pick = next((i for i in remaining if not (len(recent) == rr.max_consecutive_author
                                                          and all(author[j] == author[i] for j in recent))), pool[0])
            used[pick] = True
            order.append(pick)
            page_org += 1
            page_oon += int(oon[pick])
            page_fresh += int(fresh[pick])
            reasons.append(why)
        out = cands.take(np.array(order, dtype=np.int64))
        out["reasons"] = object_column(reasons)
        out["position"] = np.arange(1, len(order) + 1, dtype=np.int64)
        return out
