"""Query hydrators: what a request needs to know about its user, read once before the sources run."""

from __future__ import annotations

from serving.components import FunnelContext, Query, QueryHydrator


class UserQueryHydrator(QueryHydrator):
    """The user's context (follows, interests, seen / hidden sets, fatigue, affinity, embedding) from Redis,
    Feast rows and the user tower; with ``fan_out_cache`` also the follow graph's fan-out cache (HOME,
    FOLLOWING: EXPLORE and refreshes do not retrieve by follows). A Redis outage degrades, never fails."""

    def __init__(self, fan_out_cache: bool):
        self.fan_out_cache = fan_out_cache

    def params(self) -> str:
        return f"fan_out_cache={self.fan_out_cache}"

    def hydrate(self, query: Query, ctx: FunnelContext) -> None:
        query.user = ctx.user_context(query.user_id, query.degrade, need_cache=self.fan_out_cache)
