"""Filters: each returns the mask of candidates it keeps; the funnel counts (and, for
DebugRanking, reports) what each one removed."""

from __future__ import annotations

import numpy as np

from serving.components import Candidates, Filter, FunnelContext, Query, member


class OwnPostFilter(Filter):
    """A user's own posts are not candidates for their feed."""

    def keep(self, query: Query, ctx: FunnelContext, cands: Candidates) -> np.ndarray:
        return ctx.catalog.author[cands.ids] != query.user_id


class HiddenFilter(Filter):
    """Posts the user hid or was not interested in, and authors they hid (blocked)."""

    def keep(self, query: Query, ctx: FunnelContext, cands: Candidates) -> np.ndarray:
        u = query.user
        return ~member(u.hidden_posts, cands.ids) & ~member(u.blocked_authors, ctx.catalog.author[cands.ids])


class UnfollowedAuthorFilter(Filter):
    """Authors the user unfollowed recently (``candidates.unfollow_exclusion_h``): leaving an author is a
    statement about them, so their posts are not brought back as out-of-network recommendations."""

    def keep(self, query: Query, ctx: FunnelContext, cands: Candidates) -> np.ndarray:
        return ~member(query.user.unfollowed_authors, ctx.catalog.author[cands.ids])


class PreviouslySeenFilter(Filter):
    """Posts already served to the user (recent exposures), so refreshes and pages never repeat."""

    def keep(self, query: Query, ctx: FunnelContext, cands: Candidates) -> np.ndarray:
        return ~member(query.user.seen, cands.ids)


class PolicyFilter(Filter):
    """Removes policy-flagged posts when ``rerank.remove_policy_flagged`` (otherwise they are demoted)."""

    def keep(self, query: Query, ctx: FunnelContext, cands: Candidates) -> np.ndarray:
        if not query.params.rerank.remove_policy_flagged:
            return np.ones(len(cands), dtype=bool)
        return ~ctx.catalog.flagged[cands.ids]


class OutOfNetworkOnlyFilter(Filter):
    """EXPLORE: nothing by an author the user follows."""

    def keep(self, query: Query, ctx: FunnelContext, cands: Candidates) -> np.ndarray:
        return ~member(query.user.following, ctx.catalog.author[cands.ids])
