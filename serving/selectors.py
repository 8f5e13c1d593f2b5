"""Selectors: top-k cuts, the reverse-chronological order of FOLLOWING, and the rule-based
re-ranker that lays out the final ranking.

:class:`RerankSelector` fills slots in order. For each slot it picks the best remaining
candidate by score that satisfies, in priority order:

1. ad slots (``ads=True``) — every ``ad_every``-th position holds the best ad by bid x pCTR (when any);
2. out-of-network share (``out_of_network=True``) — every block of ``round(1 / min_out_of_network)`` positions (5 at
   20%) holds at least one out-of-network item: when a block's last organic slot comes and
   it has none, that slot takes the best out-of-network candidate. Any page is then >= 20%
   out-of-network and they are interleaved, never clustered at the end;
3. exploration — ``explore_slots`` per page take the best *cold* post (fresh, fewer than
   ``cold_start_impressions`` impressions) by the light ranker's click score: the heavy
   ranker's like/comment/share heads lean on a post's engagement history, which a new
   post does not have yet, so without these slots new posts would rarely be shown and
   never earn one;
4. freshness quota — likewise ``ceil(fresh_fraction x limit)`` slots take a post from the
   last ``fresh_hours`` (when one is left);
5. author diversity — never a ``max_consecutive_author + 1``-th consecutive item by one
   author.

When the pool can no longer satisfy a rule, the ranking ends there and the next request
ranks afresh: a short page rather than a fourth item in a row by one author; and after
the first page, no page without its out-of-network share (the first page is served even
when no out-of-network candidate exists at all, e.g. ANN unavailable). ``AuthorDiversityScorer`` before the heavy cut keeps one prolific
author from filling the pool in the first place.

Quota slots count what is already on the page, so a fresh out-of-network post fills both.
"""

from __future__ import annotations

import math
import numpy as np

from core.schema import POST_STAT
from core.units import HOUR_MS

from serving.components import AD, IN_NETWORK, Candidates, FunnelContext, Query, Selector


class ScoreOrderSelector(Selector):
    """Orders by score alone (the no-re-ranker ablation): no ad slots, quotas or diversity rules."""

    reads = ("score",)
    writes = ("reasons", "position")

    def select(self, query: Query, ctx: FunnelContext, cands: Candidates) -> Candidates:
        organic = np.flatnonzero(cands.source != AD)
        out = cands.take(organic[np.argsort(-cands["score"][organic], kind="stable")])
        out["reasons"] = object_column([[] for _ in range(len(out))])
        out["position"] = np.arange(1, len(out) + 1, dtype=np.int64)
        return out


class TopKSelector(Selector):
    """Keeps the ``k`` best by one score column (ads always pass: they are ranked separately).

    With ``reserve_quotas`` (the cut before the re-ranker) it also keeps the best fresh and cold
    candidates — and with ``out_of_network`` the best out-of-network ones — the re-rank quotas will
    ask for, so a quota is only unmet when no such candidate exists, not because a cut removed them.
    """

    def __init__(self, column: str, k_setting: str, reserve_quotas: bool = False, out_of_network: bool = False):
        self.column, self.k_setting = column, k_setting
        self.reserve_quotas, self.out_of_network = reserve_quotas, out_of_network
        self.reads = (column,)
        self.writes = (f"rank_by_{column}",)  # each survivor's 1-based rank here (ads: 0), for DebugRanking

    @property
    def name(self) -> str:
        return f"TopKSelector({self.column})"

    def params(self) -> str:
        quotas = f", reserve_quotas=True, out_of_network={self.out_of_network}" if self.reserve_quotas else ""
        return f"k=funnel.{self.k_setting}{quotas}"

    def select(self, query: Query, ctx: FunnelContext, cands: Candidates) -> Candidates:
        k = getattr(ctx.cfg.funnel, self.k_setting)
        ad = cands.source == AD
        organic = np.flatnonzero(~ad)
        s = cands[self.column][organic]
        if not self.reserve_quotas and s.size > 2 * k:
            organic, s = _at_least_top(organic, s, k)  # 10K -> ~k before the sort: the same first k
        order = organic[np.argsort(-s, kind="stable")]
        keep = order[:k]
        if self.reserve_quotas and order.size > k:
            rr = query.params.rerank
            rest = order[k:]
            fresh = (query.now_ms - ctx.catalog.published_ms[cands.ids[rest]]) <= rr.fresh_hours * HOUR_MS
            oon = cands.source[rest] != IN_NETWORK
            extra = [rest[fresh][: 2 * math.ceil(rr.fresh_fraction * k)]]
            if rr.explore_slots and "light_score" in cands:
                cold = cold_mask(query, ctx, cands.take(rest))
                by_light = rest[cold][np.argsort(-cands["light_score"][rest[cold]], kind="stable")]
                extra.append(by_light[: 3 * rr.explore_slots])
            if self.out_of_network:
                extra.append(rest[oon][: 2 * math.ceil(rr.min_out_of_network * k)])
            keep = np.concatenate([keep, *extra])
            keep = keep[np.sort(np.unique(keep, return_index=True)[1])]
        rank = np.zeros(len(cands), dtype=np.int32)
        rank[order] = np.arange(1, order.size + 1, dtype=np.int32)
        out = cands.take(np.concatenate([keep, np.flatnonzero(ad)]))
        out[self.writes[0]] = rank[np.concatenate([keep, np.flatnonzero(ad)])]
        return out


def _at_least_top(idx: np.ndarray, s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The entries scoring at least the k-th best, in their original order, so a stable sort of them
    starts exactly as a stable sort of all would (ties at the k-th score kept; NaN scores rank last)."""
    kth = -np.partition(-s, k - 1)[k - 1]
    if not np.isfinite(kth):
        return idx, s
    keep = s >= kth
    return idx[keep], s[keep]


def cold_mask(query: Query, ctx: FunnelContext, cands: Candidates) -> np.ndarray:
    """Fresh organic posts with fewer than ``cold_start_impressions`` impressions."""
    rr = query.params.rerank
    ids = cands.ids
    st = ctx.stats
    with st.lock:
        ok = ids < st.ints.shape[0]
        impressions = np.zeros(ids.size, dtype=np.int64)
        impressions[ok] = st.ints[ids[ok], POST_STAT["impressions"]]
    fresh = (query.now_ms - ctx.catalog.published_ms[ids]) <= rr.fresh_hours * HOUR_MS
    return fresh & (impressions < rr.cold_start_impressions) & (cands.source != AD)


def object_column(values: list) -> np.ndarray:
    """A 1-D object array (numpy would turn equal-length lists into a 2-D array)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _due(quota: int, n_slots: int, j: int) -> int:
    """How many quota items must be placed by organic slot ``j`` (0-based) of ``n_slots``: evenly spread."""
    return (quota * (j + 1)) // n_slots if n_slots else 0


class ChronologicalSelector(Selector):
    """FOLLOWING: newest first (RecencyScorer's score), no rules, no ML."""

    reads = ("score",)
    writes = ("reasons", "position")

    def select(self, query: Query, ctx: FunnelContext, cands: Candidates) -> Candidates:
        out = cands.take(np.argsort(-cands["score"], kind="stable"))
        out["reasons"] = object_column([["chronological"] for _ in range(len(out))])
        out["position"] = np.arange(1, len(out) + 1, dtype=np.int64)
        return out


class RerankSelector(Selector):
    """The whole ranking (every candidate that survived the heavy ranker), laid out slot by slot; ``ads``
    and ``out_of_network`` switch rules 1 and 2 on (HOME) or off (EXPLORE)."""

    reads = ("score",)   # and "light_score" for the exploration slots
    writes = ("reasons", "position", "score_order")  # score_order: its place by score alone (ads: among ads)

    def __init__(self, ads: bool, out_of_network: bool):
        self.ads, self.out_of_network = ads, out_of_network

    def params(self) -> str:
        return f"ads={self.ads}, out_of_network={self.out_of_network}"

    def select(self, query: Query, ctx: FunnelContext, cands: Candidates) -> Candidates:
        rr = query.params.rerank
        limit = max(query.limit, 1)
        cat = ctx.catalog
        n = len(cands)
        score = cands["score"]
        is_ad = cands.source == AD
        organic = [int(i) for i in np.argsort(-np.where(is_ad, -np.inf, score), kind="stable") if not is_ad[i]]
        ads = [int(i) for i in np.argsort(-np.where(is_ad, score, -np.inf), kind="stable") if is_ad[i]]
        organic_order, ad_order = list(organic), list(ads)
        oon_mask = ~is_ad & (cands.source != IN_NETWORK)
        had_oon = bool(oon_mask.any())  # the out-of-network rule applies only when there were such candidates
        fresh_mask = (query.now_ms - cat.published_ms[cands.ids]) <= rr.fresh_hours * HOUR_MS
        ad_every = rr.ad_every if self.ads else 0
        block = max(1, round(1 / rr.min_out_of_network)) if rr.min_out_of_network > 0 and self.out_of_network else 0
        q_block = math.ceil(rr.min_out_of_network * block) if block else 0
        block_oon = 0
        q_fresh = math.ceil(rr.fresh_fraction * limit)
        q_explore = rr.explore_slots if "light_score" in cands else 0
        cold_mask_ = cold_mask(query, ctx, cands) if q_explore else np.zeros(n, dtype=bool)
        # the slot loop below is per-candidate Python over the ~50 survivors: plain lists, not numpy scalars
        oon, fresh, cold = oon_mask.tolist(), fresh_mask.tolist(), cold_mask_.tolist()
        oon_fresh = (oon_mask & fresh_mask).tolist()
        author = cat.author[cands.ids].tolist()
        light = cands["light_score"].tolist() if q_explore else None
        streak = rr.max_consecutive_author

        def too_many(recent: list[int], i: int) -> bool:  # one too many in a row by i's author
            return len(recent) == streak and all(author[j] == author[i] for j in recent)

        order: list[int] = []
        reasons: list[list[str]] = []
        used = [False] * n
        left = organic  # organic candidates not placed yet, best first
        page_fresh = page_org = page_explore = 0
        while True:
            slot = len(order) + 1  # 1-based position in the whole ranking
            page_pos = (slot - 1) % limit
            if page_pos == 0:
                page_fresh = page_org = page_explore = 0
            if block and (slot - 1) % block == 0:
                block_oon = 0
            if ad_every and slot % ad_every == 0:
                while ads and used[ads[0]]:
                    ads.pop(0)
                recent = order[-streak:]
                ok = [i for i in ads if not too_many(recent, i)]
                if ok:  # the best ad that does not make a 4th item in a row by one author
                    i = ok[0]
                    ads.remove(i)
                    used[i] = True
                    order.append(i)
                    reasons.append(["sponsored", "ad_slot"])
                    continue
            remaining = left
            if not remaining:
                break
            n_org = limit - (limit // ad_every if ad_every else 0)
            why: list[str] = []
            want = None
            organic_left_in_block = 0
            if block:
                block_end = ((slot - 1) // block + 1) * block
                organic_left_in_block = sum(1 for p in range(slot, block_end + 1) if not (ad_every and p % ad_every == 0))
            oon_due = block and q_block - block_oon >= organic_left_in_block
            if oon_due and had_oon and not any(oon[i] for i in remaining) and len(order) >= limit:
                break  # the pool has no out-of-network item left: end the ranking here rather than break the rule
            if oon_due and any(oon[i] for i in remaining):
                want, tag = oon, "out_of_network_quota"
                if page_fresh < _due(q_fresh, n_org, page_org) and any(oon_fresh[i] for i in remaining):
                    want, tag = oon_fresh, "out_of_network_quota"
                why.append(tag)
            elif page_explore < min(q_explore, _due(q_explore, n_org, 2 * page_org)) and any(cold[i] for i in remaining):
                want = cold
                remaining = sorted((i for i in remaining if cold[i]), key=lambda i: -light[i])
                why.append("exploration")
            elif page_fresh < _due(q_fresh, n_org, page_org) and any(fresh[i] for i in remaining):
                want = fresh
                why.append("freshness_quota")
            recent = order[-streak:]
            pick = next((i for i in remaining if (want is None or want[i]) and not too_many(recent, i)), None)
            if pick is None:
                pick = next((i for i in remaining if not too_many(recent, i)), None)
            if pick is None:
                break  # only one author left: end the ranking (a short page; the next request ranks afresh)
            used[pick] = True
            left.remove(pick)
            order.append(pick)
            page_org += 1
            block_oon += int(oon[pick])
            page_fresh += int(fresh[pick])
            page_explore += int(cold[pick] and "exploration" in why)
            reasons.append(why)
        by_score = np.zeros(n, dtype=np.int32)
        for group in (organic_order, ad_order):
            by_score[group] = np.arange(1, len(group) + 1, dtype=np.int32)
        out = cands.take(np.array(order, dtype=np.int64))
        out["reasons"] = object_column(reasons)
        out["position"] = np.arange(1, len(order) + 1, dtype=np.int64)
        out["score_order"] = by_score[np.array(order, dtype=np.int64)]
        return out
